"""Errors of the Files and Batch endpoints, in the router's OpenAI envelope.

    ClientError (router.errors)
    ├── InvalidFile        400  the upload is not a usable file for its purpose
    ├── InvalidBatch       400  a create parameter is missing or wrong
    ├── FileNotFound       404  no such file for this tenant
    ├── BatchNotFound      404  no such batch for this tenant
    ├── Conflict           409  the object is in a state that forbids the action
    └── FileTooLarge       413  over ``max_file_bytes`` / ``max_batch_file_bytes``

``LeaseLost`` is internal: a worker's claim on a batch was taken over.
"""

from __future__ import annotations

from router.errors import ClientError


class InvalidFile(ClientError):
    """Raised when an upload is malformed, or a ``batch`` file is not valid JSONL."""

    code = "invalid_file"


class InvalidBatch(ClientError):
    """Raised when ``POST /v1/batches`` has a missing or invalid parameter."""

    code = "invalid_request"


class FileNotFound(ClientError):
    """Raised for a file id that does not exist or belongs to another tenant."""

    status = 404
    code = "not_found"

    def __init__(self, file_id: str) -> None:
        super().__init__(f"No such File object: {file_id}", param="file_id")


class BatchNotFound(ClientError):
    """Raised for a batch id that does not exist or belongs to another tenant."""

    status = 404
    code = "not_found"

    def __init__(self, batch_id: str) -> None:
        super().__init__(f"No such Batch object: {batch_id}", param="batch_id")


class Conflict(ClientError):
    """Raised when the object's state forbids the action (cancel a completed batch...)."""

    status = 409
    code = "conflict"


class FileTooLarge(ClientError):
    status = 413
    code = "file_too_large"


class LeaseLost(Exception):
    """Raised inside a worker when another worker has claimed its batch."""
