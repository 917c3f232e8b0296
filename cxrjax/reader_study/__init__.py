"""A blinded reader study of synthetic images: the visual Turing test.

A study folder holds everything a reader sees and nothing that gives the answer away:

  STUDY/
    study.json            the manifest: design, image list, where the answer key is and its sha256
    images/<token>.png    real and synthetic images, written the same way, under random names
    key/answer_key.json   which image is which (kept outside images/, the only folder the server reads)
    readers/<name>.json   one reader's answers, written atomically as each is given
    analysis/             report.md, analysis.json and figures from `analyze`

The three commands (`python -m cxrjax.reader_study export | serve | analyze`) are in
`__main__.py`; `export.py` builds a study from a finished generative run, `server.py`
shows it to a reader in the browser, `analysis.py` scores the answers against the key.
"""
