"""The naive reference server: what a user writes in an afternoon instead of this service.

    python bench/naive_server.py --port 8001 [--model models/acsf1-forecaster]

FastAPI with an ``async def`` handler, a dict of (h, c) per session, the same checkpoint loaded
with ``model.load_checkpoint``, uvicorn with uvloop and httptools, one process. No batching, no
``seq`` (it is accepted and ignored), no TTL, no limits, no metrics: the speed a user gets without
us, which ``bench/load_bench.py`` measures side by side with ours (issue 13). It keeps our route
and reply shape for the HTTP step (``t``, ``outputs``), so the same load generator drives both.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


class Create(BaseModel):
    session_id: str | None = None


class Step(BaseModel):
    session_id: str
    inputs: list[list[float]]
    seq: int | None = None


def make_app(model_dir: Path) -> FastAPI:
    model = load_checkpoint(model_dir).model.eval()
    sessions: dict[str, tuple[Any, int]] = {}  # id -> (LSTM state, t)
    app = FastAPI()

    @app.get("/readyz")
    async def ready() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/v1/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/v1/sessions/create")
    async def create(body: Create) -> dict[str, Any]:
        session_id = body.session_id or uuid.uuid4().hex
        sessions[session_id] = (model.zero_state(1), 0)
        return {"session_id": session_id, "t": 0}

    @app.post("/v1/sessions/step")
    async def step(body: Step) -> dict[str, Any]:
        if body.session_id not in sessions:
            raise HTTPException(404, "session not found")
        state, t = sessions[body.session_id]
        with torch.no_grad():
            out = model(torch.tensor([body.inputs]), state)
        t += len(body.inputs)
        sessions[body.session_id] = (out.state, t)
        mean, std = out.mean[0].tolist(), out.std[0].tolist()
        outputs = [{"mean": m, "std": s} for m, s in zip(mean, std, strict=True)]
        return {"session_id": body.session_id, "t": t, "outputs": outputs}

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--model", type=Path, default=ROOT / "models" / "acsf1-forecaster")
    p.add_argument("--threads", type=int, default=1, help="torch threads (ours runs on 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    uvicorn.run(
        make_app(args.model),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
