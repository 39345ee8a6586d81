"""``taskorch serve`` and its clients: the protocol, the server process, ``connect()``."""
