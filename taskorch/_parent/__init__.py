"""The application's process: the orchestrator facade, the backlog, the dispatcher core and
its backends. Nothing here runs in a worker process."""
