"""Autellix: program-level scheduling for LLM agents, served by a NATS service mesh.

Sub-packages (each a top-level folder of the repository):

- ``autellix.proto``    (proto/)    the wire contract: msgspec Structs, subject names, codecs
- ``autellix.policy``   (policy/)   pure scheduling cores: PLAS/ATLAS, multi-level queues, balancers
- ``autellix.engine``   (engine/)   model execution and the engine's batching core; never imports NATS
- ``autellix.services`` (services/) asyncio shells over NATS, the CLI and the Python client
- ``autellix.sim``      (sim/)      discrete-event simulator and workload generators
- ``autellix.bench``    (bench/)    benchmark scripts
"""

__version__ = "0.1.0"
