"""The wire contract: messages, subject names and codecs."""

# Imported as a top-level package (``import proto`` from the repository root) this folder would be a
# second copy of ``autellix.proto``, with classes unequal to the real ones: refuse it.
if not __name__.startswith("autellix."):
    raise ImportError(f"import autellix.{__name__}, not {__name__}: the folder is a sub-package of autellix")

from .codec import decode, decode_reply, encode
from .messages import (
    REJECTED,
    CallAbort,
    CallAccepted,
    CallChunk,
    CallCompleted,
    CallDispatched,
    CallError,
    CallFigures,
    CallFinal,
    CallParams,
    CallReply,
    CallRequest,
    CallRetry,
    EngineHeartbeat,
    ErrorCode,
    FinishReason,
    Message,
    ProgramEnd,
    ProgramEndReply,
    ProgramService,
    ProgramSummary,
    ProgramTable,
    StampedCall,
)
from .subjects import DEFAULT_ROOT, PROGRAM_SLOTS, SCHEDULER_QUEUE, TRACKER_QUEUE, Subjects, TrackerShard, program_slot

__all__ = [
    "DEFAULT_ROOT",
    "PROGRAM_SLOTS",
    "REJECTED",
    "SCHEDULER_QUEUE",
    "TRACKER_QUEUE",
    "CallAbort",
    "CallAccepted",
    "CallChunk",
    "CallCompleted",
    "CallDispatched",
    "CallError",
    "CallFigures",
    "CallFinal",
    "CallParams",
    "CallReply",
    "CallRequest",
    "CallRetry",
    "EngineHeartbeat",
    "ErrorCode",
    "FinishReason",
    "Message",
    "ProgramEnd",
    "ProgramEndReply",
    "ProgramService",
    "ProgramSummary",
    "ProgramTable",
    "StampedCall",
    "Subjects",
    "TrackerShard",
    "decode",
    "decode_reply",
    "encode",
    "program_slot",
]
