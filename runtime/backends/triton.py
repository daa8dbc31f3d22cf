"""Triton Inference Server backend: the model runs on a (possibly remote) Triton server.

    grpc://HOST:PORT/MODEL[/VERSION]      (gRPC, port 8001 by default)
    http://HOST:PORT/MODEL[/VERSION]      (HTTP/REST, port 8000 by default; https:// with TLS)

On ``activate()`` the engine waits for the server (with retries), checks that the model is
ready, and checks the model's inputs and outputs against docs/contract.md §6 exactly as it would a
local file; the model configuration's string ``parameters`` (heatmap_mode, num_cameras, ...,
written by ``export/to_triton.py``) become the engine's metadata. Every request has a timeout;
a request that fails because the server is unreachable is retried a bounded number of times.
The server may batch requests from many clients together (dynamic batching); this engine sends
at most the model's ``max_batch_size`` clips per request.
"""
from __future__ import annotations

import threading
import time
from typing import Dict, List, Optional
from urllib.parse import urlsplit

import numpy as np

from keyreid.errors import KeyreidError
from keyreid.lazy import require
from keyreid.model_metadata import SCHEMA_KEYS, read_metadata
from keyreid.contract import INPUTS
from keyreid.cli import positive_float
from keyreid.runtime.backends.declaration import Backend, EngineOption
from keyreid.runtime.backends.base import Engine, EngineInfo, FoundTensor, check_io
from keyreid.triton import (DEFAULT_PORTS, NUMPY_DATATYPES, TRITON_DATATYPES, URL_SCHEMES,
                            parameters_from_config, wire_dims)

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRIES = 3
RETRY_DELAY_S = 0.5           # doubles after every failed attempt
_SCALAR_INPUTS = tuple(spec.name for spec in INPUTS if len(spec.shape) == 1)


class TritonLocation:
    """A parsed ``grpc://HOST:PORT/MODEL[/VERSION]`` (or http/https) engine location."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        path = [part for part in parts.path.split("/") if part]
        if scheme not in URL_SCHEMES or not parts.hostname or not 1 <= len(path) <= 2:
            raise KeyreidError(f"{url}: not a Triton engine address; expected "
                               "grpc://HOST:PORT/MODEL or http://HOST:PORT/MODEL (optionally /VERSION)")
        try:
            port = parts.port or DEFAULT_PORTS[scheme]
        except ValueError:
            raise KeyreidError(f"{url}: the port is not a number between 0 and 65535") from None
        if len(path) == 2 and not path[1].isdigit():
            raise KeyreidError(f"{url}: model version {path[1]!r} is not a whole number")
        self.url = url
        self.protocol = "grpc" if scheme == "grpc" else "http"
        self.ssl = scheme == "https"
        self.server = f"{parts.hostname}:{port}"
        self.model = path[0]
        self.version = path[1] if len(path) == 2 else ""

    def __str__(self) -> str:
        return self.url


def _found_tensor(entry: dict, scalar_names=()) -> FoundTensor:
    """A tensor of Triton's model metadata (``{"name", "datatype", "shape"}``, -1 = dynamic).
    For a batching model the metadata already includes the batch axis, as the contract does; a
    per-clip scalar of the contract that arrives as [N, 1] (see ``wire_dims``) counts as [N]."""
    shape = tuple(None if int(dim) < 0 else int(dim) for dim in entry["shape"])
    if entry["name"] in scalar_names and len(shape) == 2 and shape[1] == 1:
        shape = shape[:1]
    return FoundTensor(entry["name"], NUMPY_DATATYPES.get(entry["datatype"]), shape)


def _reason(exc: BaseException) -> str:
    """The server's or the network's one-line reason for a failure."""
    message = getattr(exc, "message", None)
    text = message() if callable(message) else str(exc)
    text = (text or type(exc).__name__).strip().splitlines()[0]
    return text


def _is_unreachable(exc: BaseException) -> bool:
    """A failure worth retrying: no connection, or the server did not answer in time."""
    if isinstance(exc, OSError):
        return True
    status = getattr(exc, "status", None)
    status = str(status() if callable(status) else status or "")
    return status in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "503", "504")


class TritonEngine(Engine):
    """A KeyRe-ID model served by Triton Inference Server, reached over gRPC or HTTP."""

    backend = "triton"

    def __init__(self, url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES,
                 max_batch: Optional[int] = None, num_cameras: Optional[int] = None):
        """
        Args:
            url: ``grpc://HOST:PORT/MODEL[/VERSION]``, ``http://...`` or ``https://...``.
            timeout_s: longest wait for one request (connecting, metadata, one inference).
            retries: further attempts after a request failed because the server could not be
                reached (with a doubling pause, from 0.5 s); other failures are not retried.
            max_batch: most clips per request; None takes the model's ``max_batch_size``.
            num_cameras: overrides the model's ``num_cameras`` parameter.
        """
        self.location = TritonLocation(url)
        super().__init__(url, num_cameras=num_cameras)
        self.path = url     # an address, not a file: keep it exactly as given for messages
        if not timeout_s > 0:
            raise KeyreidError(f"timeout must be above 0 seconds, got {timeout_s}")
        if retries < 0:
            raise KeyreidError(f"retries must not be negative, got {retries}")
        if max_batch is not None and max_batch < 1:
            raise KeyreidError(f"max_batch must be at least 1, got {max_batch}")
        self._timeout_s = float(timeout_s)
        self._retries = retries
        self._max_batch = max_batch
        self._module = None
        self._clients: List[object] = []
        self._local = threading.local()
        self._lock = threading.Lock()
        self._output_names: List[str] = []

    # --- connection ---------------------------------------------------------------------
    def _client(self):
        """This thread's client: the HTTP client is not thread-safe, so each thread has its own."""
        client = getattr(self._local, "client", None)
        if client is None:
            location, module = self.location, self._module
            if location.protocol == "grpc":
                client = module.InferenceServerClient(location.server, ssl=location.ssl)
            else:
                client = module.InferenceServerClient(location.server, ssl=location.ssl,
                                                      connection_timeout=self._timeout_s,
                                                      network_timeout=self._timeout_s)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _options(self, as_json: bool = False) -> dict:
        """Keyword arguments for a client call: gRPC calls take a per-call deadline (HTTP clients
        carry theirs from construction) and return protobuf messages unless asked for JSON."""
        if self.location.protocol != "grpc":
            return {}
        return {"client_timeout": self._timeout_s, **({"as_json": True} if as_json else {})}

    def _call(self, what: str, call, retries: Optional[int] = None):
        """Run ``call(client)``, retrying while the server cannot be reached."""
        retries = self._retries if retries is None else retries
        delay = RETRY_DELAY_S
        for attempt in range(retries + 1):
            try:
                return call(self._client())
            except Exception as exc:   # tritonclient raises its own, grpc's and gevent's types
                if not _is_unreachable(exc):
                    raise KeyreidError(f"{self.path}: {what} failed: {_reason(exc)}") from exc
                if attempt == retries:
                    raise KeyreidError(
                        f"{self.path}: {what} failed: Triton server at {self.location.server} cannot be "
                        f"reached ({_reason(exc)}) after {retries + 1} attempt(s); is tritonserver "
                        "running, and are the host, port and protocol (gRPC 8001, HTTP 8000) right?"
                    ) from exc
                time.sleep(delay)
                delay *= 2

    # --- the engine hooks ---------------------------------------------------------------
    def activate_impl(self) -> EngineInfo:
        self._module = require(f"tritonclient.{self.location.protocol}")
        try:
            return self._connect()
        except BaseException:
            self.deactivate_impl()    # close the connections a failed activation opened
            raise

    def _connect(self) -> EngineInfo:
        location = self.location
        if not self._call("checking the server", lambda c: c.is_server_live(**self._options())):
            raise KeyreidError(f"{self.path}: Triton server at {location.server} is not live")
        ready = self._call("checking the model", lambda c: c.is_model_ready(
            location.model, location.version, **self._options()))
        if not ready:
            raise KeyreidError(f"{self.path}: model '{location.model}'"
                               + (f" version {location.version}" if location.version else "")
                               + " is not ready on the server" + self._served_models())
        metadata = self._call("reading the model metadata", lambda c: c.get_model_metadata(
            location.model, location.version, **self._options(as_json=True)))
        config = self._call("reading the model configuration", lambda c: c.get_model_config(
            location.model, location.version, **self._options(as_json=True)))
        config = config.get("config", config)   # gRPC wraps the configuration, HTTP does not

        server_max_batch = int(config.get("max_batch_size", 0) or 0)   # 0: the model does not batch
        # keyreid's repository writer puts the file's metadata in the parameters, beside any the
        # server adds; a model served otherwise (serve_triton.py's PyTriton, a hand-written
        # configuration) carries none: then the contract's geometry applies and the camera count
        # is unknown (--num-cameras, or camera -1)
        parameters = {key: value for key, value in parameters_from_config(config).items() if key in SCHEMA_KEYS}
        model_metadata = read_metadata(parameters, self.path) if parameters else None
        input_specs, output_specs = check_io(
            self.path, [_found_tensor(entry, _SCALAR_INPUTS) for entry in metadata.get("inputs", [])],
            [_found_tensor(entry) for entry in metadata.get("outputs", [])], model_metadata)
        num_cameras = model_metadata.num_cameras if model_metadata else None
        max_batch = self._max_batch
        if server_max_batch > 0:
            if max_batch is not None and max_batch > server_max_batch:
                raise KeyreidError(f"{self.path}: max_batch {max_batch} is above the model's "
                                   f"max_batch_size of {server_max_batch}")
            max_batch = max_batch or server_max_batch
        self._output_names = [spec.name for spec in output_specs]
        return EngineInfo(input_specs, output_specs, max_batch, num_cameras, model_metadata)

    def _served_models(self) -> str:
        """``"; it has: a (ready), b (unavailable)"`` where the server lets us list its models."""
        try:
            index = self._call("listing the models", lambda c: c.get_model_repository_index(
                **self._options(as_json=True)), retries=0)
        except KeyreidError:   # the model-repository endpoint may be locked (PyTriton locks it)
            return ""
        index = index.get("models", []) if isinstance(index, dict) else index
        described = [f"{entry.get('name')} ({(entry.get('state') or 'unknown').lower()})" for entry in index]
        return "; it has: " + (", ".join(described) or "no models")

    def infer_impl(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        module, location = self._module, self.location

        def request(client):
            inputs = []
            for name, array in feed.items():
                array = np.ascontiguousarray(array.reshape((len(array),) + wire_dims(array.shape)))
                tensor = module.InferInput(name, list(array.shape), TRITON_DATATYPES[array.dtype])
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            outputs = [module.InferRequestedOutput(name) for name in self._output_names]
            return client.infer(location.model, inputs, model_version=location.version,
                                outputs=outputs, **self._options())

        result = self._call("inference", request)
        return {name: result.as_numpy(name) for name in self._output_names}

    def deactivate_impl(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception:   # closing a dead connection must not hide the caller's error
                pass
        self._local = threading.local()
        self._output_names = []


TIMEOUT = EngineOption(
    "--timeout", "timeout_s", "longest wait for one request to the server, in seconds (default: 60); "
    "requests the server cannot take are retried 3 times", type=positive_float, metavar="S")

BACKEND = Backend(
    name="triton", kinds=("triton",), engine_class=TritonEngine, options=(TIMEOUT,),
    summary="a Triton Inference Server at grpc:// or http(s)://",
    device="wherever the server runs (this process only sends requests)")
