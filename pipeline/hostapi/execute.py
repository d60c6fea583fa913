"""`skyferry exec` on the wire: a command run inside a container, and what it printed."""

import base64

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STDIN = 16 << 20  # stdin and each output travel in one JSON body
MAX_TIMEOUT_S = 3600.0


class ExecRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    args: list[str] = Field(min_length=1)
    stdin: str = ""  # base64
    timeout: float = Field(default=60.0, gt=0, le=MAX_TIMEOUT_S)

    @field_validator("stdin")
    @classmethod
    def _small_base64(cls, value: str) -> str:
        if len(value) > MAX_STDIN * 4 // 3 + 4:
            raise ValueError(f"stdin is larger than {MAX_STDIN >> 20} MiB")
        base64.b64decode(value, validate=True)
        return value


class ExecResult(BaseModel):
    exit_code: int
    stdout: str  # base64
    stderr: str  # base64

    @classmethod
    def of(cls, exit_code: int, stdout: bytes, stderr: bytes) -> "ExecResult":
        return cls(
            exit_code=exit_code,
            stdout=base64.b64encode(stdout[-MAX_STDIN:]).decode(),
            stderr=base64.b64encode(stderr[-MAX_STDIN:]).decode(),
        )
