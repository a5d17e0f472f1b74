"""The wire contract: messages, subject names and codecs."""

from .codec import decode, decode_reply, encode
from .messages import (
    CallAbort,
    CallChunk,
    CallCompleted,
    CallDispatched,
    CallError,
    CallFinal,
    CallReply,
    CallRequest,
    EngineHeartbeat,
    ErrorCode,
    Message,
    ProgramEnd,
    ProgramService,
    ProgramSummary,
    ProgramTable,
    StampedCall,
)
from .subjects import DEFAULT_ROOT, SCHEDULER_QUEUE, TRACKER_QUEUE, Subjects

__all__ = [
    "DEFAULT_ROOT",
    "SCHEDULER_QUEUE",
    "TRACKER_QUEUE",
    "CallAbort",
    "CallChunk",
    "CallCompleted",
    "CallDispatched",
    "CallError",
    "CallFinal",
    "CallReply",
    "CallRequest",
    "EngineHeartbeat",
    "ErrorCode",
    "Message",
    "ProgramEnd",
    "ProgramService",
    "ProgramSummary",
    "ProgramTable",
    "StampedCall",
    "Subjects",
    "decode",
    "decode_reply",
    "encode",
]
