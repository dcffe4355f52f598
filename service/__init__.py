"""The BentoML service around the model: sessions, batching, transports, metrics."""

import os

# Large CPU tensors (the session state pool: ~1 GB at a million sessions) on transparent huge
# pages, where the kernel offers them on request (madvise mode): steps gather and scatter random
# rows of the pool, and with 4 KiB pages each row costs a TLB miss. Read by torch at its first
# large allocation, so set before any; a value from the environment wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
