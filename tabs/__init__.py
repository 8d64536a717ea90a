"""The app's tabs, one module each: its components, its handlers and its events.

``app.py`` assembles them: ``source`` (the image panel and the encode chain),
then one ``build(wiring) -> Tab`` per tab. Gradio lives here and in ``app.py``
only; every number comes from ``compress/``, every picture from ``viz/``.
"""
