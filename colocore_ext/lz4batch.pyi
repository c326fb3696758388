from typing_extensions import Buffer

HEADER_SIZE: int
KIND_RAW: int
KIND_LZ4: int
MAX_INPUT_SIZE: int
LIBRARY: str
LZ4_VERSION: int

def compress(buf: Buffer, acceleration: int = ...) -> bytes: ...
def decompress(blob: Buffer, expected_size: int) -> bytes: ...
def decompress_into(blob: Buffer, out: Buffer) -> int: ...
