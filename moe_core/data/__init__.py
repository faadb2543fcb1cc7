"""The data: the corpus (corpus), the tokenizer (tokenizer), the corpus as token ids (tokens) and token
categories (categories)."""
