"""The client side of ``taskorch serve``: what runs in the application's process (see
``taskorch._service``'s map)."""
