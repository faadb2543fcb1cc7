"""`reindex_once`: Bokeh re-indexes a document at most once per block, and only when asked."""
import panel as pn
from bokeh.document import Document
from bokeh.models import Div, ImportedStyleSheet
from panel.io.state import set_curdoc

from app.dashboard import reindex_once


def served_doc():
    doc = Document()
    divs = [Div(text=str(i)) for i in range(3)]
    for d in divs:
        doc.add_root(d)
    calls = []
    real = doc.models.recompute
    doc.models.recompute = lambda: (calls.append(1), real())
    return doc, divs, calls


def test_model_reference_changes_reindex_once_at_the_end():
    doc, divs, calls = served_doc()
    with set_curdoc(doc):
        for d in divs:                                    # unguarded: one re-index per change
            d.stylesheets = [ImportedStyleSheet(url=f"/a{d.text}.css")]
        assert len(calls) == 3
        calls.clear()
        with reindex_once():
            for d in divs:
                d.stylesheets = [ImportedStyleSheet(url=f"/b{d.text}.css")]
                with reindex_once():                      # nested blocks join the outer one
                    d.stylesheets = [ImportedStyleSheet(url=f"/c{d.text}.css")]
            assert calls == []                            # nothing while inside
        assert len(calls) == 1
        new = {m.url for m in doc.models if isinstance(m, ImportedStyleSheet)}
        assert new == {"/c0.css", "/c1.css", "/c2.css"}   # the index knows the new models


def test_plain_value_changes_do_not_reindex_and_no_document_is_fine():
    doc, divs, calls = served_doc()
    with set_curdoc(doc):
        with reindex_once():
            for d in divs:
                d.text = d.text + "!"
        assert calls == []                                # freeze() would have re-indexed anyway
        assert "invalidate" not in vars(doc.models)       # the document's own method is back
    with reindex_once():                                  # a notebook: no served document
        pn.pane.HTML("x").object = "y"
