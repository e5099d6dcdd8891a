"""The gRPC floor: what one call costs grpcio's asyncio server on this machine before any work.
Triton's `inference.GRPCInferenceService` on `grpc.aio` and uvloop (as convserve's worker runs
it), answering every ModelInfer with the same ten probabilities: no model, no parsing, no
checks. perf_analyzer measures it like any server (its metadata and config say
`floor`, UINT8 [N, 1, 28, 28] in, FP32 [N, 10] out).

    python -m convserve.loadtest.peers.floor_grpc --port 8101
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import uvloop
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2

pb: Any = service_pb2  # protoc's modules make their classes at run time
config_pb: Any = model_config_pb2
SERVICE = "inference.GRPCInferenceService"
METADATA = json_format.ParseDict(
    {"name": "floor", "versions": ["1"], "platform": "floor",
     "inputs": [{"name": "input", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}],
     "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]},
    pb.ModelMetadataResponse(),
)  # fmt: skip
CONFIG = pb.ModelConfigResponse(
    config=json_format.ParseDict(
        {"name": "floor", "max_batch_size": 64,
         "input": [{"name": "input", "data_type": "TYPE_UINT8", "dims": [1, 28, 28]}],
         "output": [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [10]}]},
        config_pb.ModelConfig(),
    )
)  # fmt: skip
ANSWER = np.full((1, 10), 0.1, np.float32).tobytes()


def _answer(request: Any) -> Any:
    response = pb.ModelInferResponse(model_name=request.model_name, model_version="1",
                                      id=request.id)  # fmt: skip
    response.outputs.add(name="probabilities", datatype="FP32", shape=[1, 10])
    response.raw_output_contents.append(ANSWER)
    return response


async def infer(request: Any, context: Any) -> Any:
    return _answer(request)


async def stream(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
    async for request in requests:
        yield pb.ModelStreamInferResponse(infer_response=_answer(request))


def _unary(name: str, handler: Any) -> grpc.RpcMethodHandler:
    method = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name[name]
    return grpc.unary_unary_rpc_method_handler(
        handler,
        request_deserializer=getattr(pb, method.input_type.name).FromString,
        response_serializer=getattr(pb, method.output_type.name).SerializeToString,
    )


async def _fixed(answer: Any) -> Any:
    async def handler(request: Any, context: Any) -> Any:
        return answer

    return handler


async def main(port: int) -> None:
    server = grpc.aio.server()
    handlers = {
        "ModelInfer": _unary("ModelInfer", infer),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
            stream,
            request_deserializer=pb.ModelInferRequest.FromString,
            response_serializer=pb.ModelStreamInferResponse.SerializeToString,
        ),
    }
    for name, answer in (
        ("ServerLive", pb.ServerLiveResponse(live=True)),
        ("ServerReady", pb.ServerReadyResponse(ready=True)),
        ("ModelReady", pb.ModelReadyResponse(ready=True)),
        ("ServerMetadata", pb.ServerMetadataResponse(name="floor", version="1")),
        ("ModelMetadata", METADATA),
        ("ModelConfig", CONFIG),
    ):
        handlers[name] = _unary(name, await _fixed(answer))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8101)
    uvloop.run(main(parser.parse_args().port))
