"""The server side of ``taskorch serve``: what runs in the server process (see
``taskorch._service``'s map)."""
