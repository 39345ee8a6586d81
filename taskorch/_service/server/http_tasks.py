"""``taskorch serve --http``'s task records and actions (server process, an HTTP request's
thread; issue 25): the routes over ``operator.Operator``, which waits for the journal in the
request's thread (never the dispatcher's).

    GET  /api/tasks?state=&name=&limit=&before_id=   records, newest first (``state``:
                                                     repeated or comma-separated)
    GET  /api/tasks/{id}                             one record (404: unknown)
    POST /api/tasks/{id}/cancel[?terminate=1]        {"cancelled": bool}
    POST /api/tasks/{id}/retry                       {"id": the new task's id}
    POST /api/purge[?name=]                          {"cancelled": how many}

Who may ask is ``http``'s business (every POST needs the bearer token and a same-origin
request, or none); these functions only route and map errors to statuses: 400 for a bad
argument or an action that does not apply (retrying a task that succeeded), 404 for an unknown
id or path, 503 when the backlog refuses a retry or the journal does not answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from taskorch._errors import TaskNotFoundError, TaskorchError

if TYPE_CHECKING:
    from taskorch._service.server.operator import Operator

Answer = tuple[int, Any]
Query = dict[str, list[str]]


def is_task_path(path: str) -> bool:
    return path == "/api/tasks" or path.startswith("/api/tasks/") or path == "/api/purge"


def get(operator: Operator, path: str, query: Query) -> Answer:
    if path == "/api/tasks":
        return _answer(lambda: [info.to_dict() for info in operator.tasks(
            _states(query), _one(query, "name"), _int(query, "limit", 50),
            _int(query, "before_id", None))])
    task_id = _id(path, "")
    if task_id is None:
        return 404, {"error": f"not found: {path}"}
    return _answer(lambda: operator.task(task_id).to_dict())


def post(operator: Operator, path: str, query: Query) -> Answer:
    if path == "/api/purge":
        return _answer(lambda: {"cancelled": operator.purge(_one(query, "name"))})
    cancel_id, retry_id = _id(path, "/cancel"), _id(path, "/retry")
    if cancel_id is not None:
        terminate = _one(query, "terminate") in ("1", "true", "yes")
        return _answer(lambda: {"cancelled": operator.cancel(cancel_id, terminate)})
    if retry_id is not None:
        return _answer(lambda: {"id": operator.retry(retry_id)})
    return 404, {"error": f"not found: {path}"}


def _answer(fn: Callable[[], Any]) -> Answer:
    try:
        return 200, fn()
    except TaskNotFoundError as exc:
        return 404, {"error": str(exc)}
    except ValueError as exc:
        return 400, {"error": str(exc)}
    except (TaskorchError, TimeoutError) as exc:
        return 503, {"error": f"{type(exc).__name__}: {exc}"}


def _id(path: str, suffix: str) -> int | None:
    """The id in ``/api/tasks/{id}{suffix}``, else None."""
    head = "/api/tasks/"
    if not path.startswith(head) or not path.endswith(suffix):
        return None
    text = path[len(head):len(path) - len(suffix)]
    return int(text) if text.isdigit() and len(text) < 19 else None


def _states(query: Query) -> tuple[str, ...]:
    return tuple(s for value in query.get("state", ()) for s in value.split(",") if s)


def _one(query: Query, name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def _int(query: Query, name: str, default: int | None) -> Any:
    value = _one(query, name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
