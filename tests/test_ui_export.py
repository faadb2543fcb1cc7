"""Browser test: the JSON download in the served app is the `moe-lab route --json` trace of the page's routing.

Needs app/dashboard.py to show `ExportPanel` (app/views/export.py), either on the page or in a tab
named "Export".
"""
from __future__ import annotations

import json
import re

import pytest
from playwright.sync_api import Page, expect

from tests.test_ui import IGNORED, JOINED_TOKENS, open_app

pytestmark = pytest.mark.ui

SCHEMA_KEYS = {"model", "scheme", "top_k", "capacity_factor", "truncated", "tokens", "layers", "params", "loss"}
LAYER_KEYS = {"layer", "experts", "weights", "dropped", "choices", "probs", "load", "capacity", "metrics"}


def test_json_download_is_the_routing_trace(page: Page, app_url):
    errors = open_app(page, app_url)
    routed = page.evaluate(JOINED_TOKENS)          # the text the Router tab shows as tokens
    button = page.locator(".export-json button").first
    if not button.is_visible():     # the export panel lives in the Router details tab: open it
        page.get_by_text("Router details", exact=True).first.click()
    expect(button).to_be_visible()
    expect(button).to_be_enabled()
    with page.expect_download() as info:
        button.click()
    download = info.value
    assert re.fullmatch(r"routing-moe-n\d+-[a-z_]+(-k\d+)?(-cf[0-9.]+)?\.json", download.suggested_filename), \
        download.suggested_filename
    with open(download.path(), encoding="utf-8") as f:
        d = json.load(f)
    assert set(d) == SCHEMA_KEYS
    assert d["layers"] and set(d["layers"][0]) == LAYER_KEYS
    assert len(d["layers"]) == d["model"]["n_layer"]
    T = len(d["tokens"])
    assert T > 0 and all(len(L["experts"]) == T for L in d["layers"])
    assert download.suggested_filename.startswith(f"routing-{d['model']['name']}-{d['scheme']}")
    # the page routed its example text: the trace's tokens are the tokens on the page
    assert "".join(t["text"] for t in d["tokens"]) == routed
    assert not [e for e in errors if not any(i in e for i in IGNORED)], errors
