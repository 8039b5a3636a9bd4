"""A flood of report calls from a process of its own (so it competes with
the server for the machine, not for the test's interpreter lock).

    python -m tests.support.report_flood TARGET ACCOUNT_ID CONCURRENCY

Reads commands on stdin, one a line: `flood` starts CONCURRENCY loops of
ListTransactions on the account, `quiet` stops them and prints
`served refused other` (counts since the last `flood`); end of input exits.
A refused call (RESOURCE_EXHAUSTED / UNAVAILABLE) waits the RetryInfo delay
the server sent, as a well-behaved client does, then tries again.
"""

from __future__ import annotations

import asyncio
import sys

import grpc
from fuelcard.v1 import account_pb2, account_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

REFUSED = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)


def retry_delay_s(err: grpc.aio.AioRpcError) -> float:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for detail in status.details if status is not None else []:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToMilliseconds()) / 1000.0
    return 0.1


async def main(target: str, account_id: str, concurrency: int) -> None:
    counts = {"served": 0, "refused": 0, "other": 0}
    running = asyncio.Event()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = account_pb2_grpc.AccountServiceStub(channel)
        request = account_pb2.ListTransactionsRequest(account_id=account_id, page_size=100)

        async def loop() -> None:
            while True:
                await running.wait()
                try:
                    await stub.ListTransactions(request, timeout=10)
                    counts["served"] += 1
                except grpc.aio.AioRpcError as err:
                    if err.code() in REFUSED:
                        counts["refused"] += 1
                        await asyncio.sleep(retry_delay_s(err))
                    else:
                        counts["other"] += 1
                        await asyncio.sleep(0.1)

        tasks = [asyncio.create_task(loop()) for _ in range(concurrency)]
        reader = asyncio.StreamReader()
        await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := (await reader.readline()).decode().strip():
            if line == "flood":
                for key in counts:
                    counts[key] = 0
                running.set()
            elif line == "quiet":
                running.clear()
                await asyncio.sleep(0.3)  # let calls in flight end
                print(counts["served"], counts["refused"], counts["other"], flush=True)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
