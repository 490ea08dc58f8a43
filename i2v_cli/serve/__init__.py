"""``i2v serve``: the pipeline and the index behind an HTTP API and a web page (needs the ``serve`` extra).

- :mod:`.batcher`: concurrent requests' images gathered into network batches, one worker thread;
- :mod:`.uploads`: uploads decoded with the checks of ``i2v tag``;
- :mod:`.service`: models, decoding pool, records and index access, without HTTP;
- :mod:`.guard`: token, Host check, body size and time limits, for every request;
- :mod:`.app`: the FastAPI routes; :mod:`.page`: the web page.
"""
