"""The loyalty plugin's job, written as a competent Python developer would
without Weir: a durable pull consumer that fetches in batches, parses each
order, awards points (kept in memory: the at-least-once version, no
durable state), publishes one output per order with the publishes of a
batch pipelined, then acks the batch.

    python loyalty_consumer.py NATS_URL STREAM SUBJECT COUNT OUTPUT_SUBJECT

Prints one JSON line: {"events": N, "seconds": T}, timed from the first
fetch to the last ack.
"""

import asyncio
import json
import pathlib
import sys
import time

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "plugins" / "loyalty"))
from points import earned  # noqa: E402  (the plugin's own rule)


async def main(url: str, stream: str, subject: str, count: int, output: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe(
        subject,
        durable="peer-python",
        stream=stream,
        config=ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            max_ack_pending=4096,
        ),
    )
    totals: dict[str, int] = {}
    done = 0
    started = time.perf_counter()
    while done < count:
        try:
            messages = await sub.fetch(batch=256, timeout=5)
        except nats.errors.TimeoutError:
            continue
        publishes = []
        for message in messages:
            order = json.loads(message.data)
            customer = str(order["customer_id"])
            points = earned(int(order["amount_cents"]), 1)
            totals[customer] = totals.get(customer, 0) + points
            body = json.dumps(
                {
                    "customer_id": customer,
                    "order_id": str(order["order_id"]),
                    "earned": points,
                    "total": totals[customer],
                },
                separators=(",", ":"),
            ).encode()
            publishes.append(
                js.publish(
                    output,
                    body,
                    headers={
                        "Customer-Id": customer,
                        "Nats-Msg-Id": f"peer:{message.metadata.sequence.stream}",
                    },
                )
            )
        await asyncio.gather(*publishes)
        for message in messages:
            await message.ack()
        done += len(messages)
    await nc.flush()
    seconds = time.perf_counter() - started
    await nc.close()
    print(json.dumps({"events": done, "seconds": seconds}))


if __name__ == "__main__":
    url, stream, subject, count, output = sys.argv[1:6]
    asyncio.run(main(url, stream, subject, int(count), output))
