"""Code that runs in worker processes (local ones, and Dask workers). It imports only the
modules shared by both sides (``_wire``, ``_errors``, ``_policy``), never ``_parent``, and
starts no thread at import."""
