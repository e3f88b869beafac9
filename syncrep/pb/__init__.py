"""Generated protobuf and gRPC modules. Do not edit: run `python protos/generate.py`."""
