"""The Open Inference Protocol over gRPC: its published proto (open_inference_grpc.proto, unchanged, from
kserve/open-inference-protocol), the streaming call of Triton's API (stream_infer.proto) and the code
protoc generates from them, checked in. `make protos` regenerates it:

    python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
        service/api/inference_protocol/grpc/open_inference_grpc.proto \
        service/api/inference_protocol/grpc/stream_infer.proto

The generated modules register the `inference.*` messages in protobuf's default descriptor pool, as
tritonclient's own copy does: one process should import one of the two, not both."""
