"""Drives a KServe v2 gRPC endpoint with tritonclient and prints what it saw as one JSON line.

Run in its own process: tritonclient registers the `inference` protobuf package too, and two
copies of it cannot share the default descriptor pool with meshproxy's generated code.
Usage: python -m tests.integration.triton_client HOST:PORT basics|stream N|unknown
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
import tritonclient.grpc.aio as triton
from tritonclient.utils import InferenceServerException


def _input(name: str, values, datatype: str = "FP32") -> triton.InferInput:
    array = np.asarray(values, dtype={"FP32": np.float32, "FP64": np.float64}[datatype])
    t = triton.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


async def basics(client) -> dict:
    meta = await client.get_server_metadata(as_json=True)
    model_meta = await client.get_model_metadata("sum", as_json=True)
    result = await client.infer("sum", [_input("input0", [1.5, 2.0, 3.5], "FP64")])
    index = await client.get_model_repository_index(as_json=True)
    return {
        "live": await client.is_server_live(),
        "ready": await client.is_server_ready(),
        "server": meta["name"],
        "identity_ready": await client.is_model_ready("identity"),
        "metadata_inputs": [i["name"] for i in model_meta["inputs"]],
        "sum": result.as_numpy("sum").tolist(),
        "served_by": result.get_response().parameters["runtime"].string_param,
        "index": sorted(m["name"] for m in index.get("models", [])),
    }


async def stream(client, n: int) -> dict:
    async def requests():
        for i in range(n):
            yield {"model_name": "identity", "inputs": [_input("input0", [float(i), 1.0])],
                   "request_id": str(i)}

    seen = []
    async for result, error in client.stream_infer(requests()):
        if error is not None:
            seen.append({"error": str(error)})
            continue
        response = result.get_response()
        seen.append({"id": response.id, "first": float(result.as_numpy("output0")[0]),
                     "runtime": response.parameters["runtime"].string_param})
    return {"responses": seen}


async def unknown(client) -> dict:
    try:
        await client.infer("no-such-model", [_input("input0", [1.0])])
    except InferenceServerException as e:
        return {"status": e.status(), "message": e.message()}
    return {"status": "OK"}


async def main(url: str, scenario: str, *args: str) -> None:
    client = triton.InferenceServerClient(url)
    try:
        if scenario == "basics":
            out = await basics(client)
        elif scenario == "stream":
            out = await stream(client, int(args[0]))
        else:
            out = await unknown(client)
    finally:
        await client.close()
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
