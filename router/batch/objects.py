"""File bodies in object storage through obstore: a local directory, S3(-compatible), GCS, Azure.

Bodies are only ever streamed: uploads go out as multipart puts fed by an async
iterator, downloads come back as chunks, so no file is held in memory whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import NotFoundError
from obstore.store import LocalStore, from_url

from router.batch.config import StorageConfig

#: Multipart part size and parallel parts of one upload: bounds an upload's buffers.
PART_SIZE = 5 * 1024 * 1024
PART_CONCURRENCY = 2
READ_CHUNK = 1024 * 1024


class ObjectMissing(Exception):
    """Raised when the object of a file row is gone from storage."""


def open_store(config: StorageConfig) -> Any:
    """An obstore store for ``config.url``; local directories are created."""
    scheme = urlsplit(config.url).scheme
    if scheme in ("", "file"):
        path = Path(config.url.removeprefix("file://") if scheme else config.url)
        path = path.expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return LocalStore(prefix=path, mkdir=True)
    options: dict[str, Any] = dict(config.options)
    if scheme in ("s3", "s3a"):
        for key in ("endpoint", "region", "access_key_id"):
            if (value := getattr(config, key)) is not None:
                options[key] = value
        if config.secret_access_key is not None:
            options["secret_access_key"] = config.secret_access_key.get_secret_value()
        if config.session_token is not None:
            options["session_token"] = config.session_token.get_secret_value()
    client: Any = {"allow_http": True} if config.allow_http else None
    settings: Any = options or None
    return from_url(config.url, config=settings, client_options=client)


class Objects:
    """The object operations the batch service needs, keyed by ``files/<file id>``."""

    def __init__(self, store: Any) -> None:
        self.store = store

    @staticmethod
    def key(file_id: str) -> str:
        return f"files/{file_id}"

    async def put_stream(self, key: str, chunks: AsyncIterable[bytes]) -> None:
        await obstore.put_async(self.store, key, chunks, chunk_size=PART_SIZE,
                                max_concurrency=PART_CONCURRENCY)

    async def read(self, key: str) -> AsyncIterator[bytes]:
        """The object's bytes in chunks of about ``READ_CHUNK``."""
        try:
            result = await obstore.get_async(self.store, key)
        except (NotFoundError, FileNotFoundError) as exc:
            raise ObjectMissing(key) from exc
        async for chunk in result.stream(min_chunk_size=READ_CHUNK):
            yield bytes(chunk)

    async def delete(self, key: str) -> None:
        with contextlib.suppress(NotFoundError, FileNotFoundError):
            await obstore.delete_async(self.store, key)
