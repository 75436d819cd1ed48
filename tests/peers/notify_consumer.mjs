// The notify plugin's job, written as a competent JavaScript developer
// would without Weir: a durable pull consumer (npm `nats`) that fetches in
// batches, formats each order's email with the plugin's own format.js,
// publishes one output per order with the publishes of a batch pipelined,
// then acks the batch.
//
//   node notify_consumer.mjs NATS_URL STREAM SUBJECT COUNT OUTPUT_SUBJECT
//
// Prints one JSON line: {"events": N, "seconds": T}, timed from the first
// fetch to the last ack.
import { AckPolicy, DeliverPolicy, connect, headers } from "nats";
import { formatEmail } from "../../plugins/notify/format.js";

const [url, stream, subject, countText, output] = process.argv.slice(2);
const count = Number(countText);

const nc = await connect({ servers: url });
const jsm = await nc.jetstreamManager();
await jsm.consumers.add(stream, {
  durable_name: "peer-node",
  ack_policy: AckPolicy.Explicit,
  deliver_policy: DeliverPolicy.All,
  filter_subject: subject,
  max_ack_pending: 4096,
});
const js = nc.jetstream();
const consumer = await js.consumers.get(stream, "peer-node");
const settings = { from: "orders@shop.example", recipientDomain: "customers.example" };

let done = 0;
const started = performance.now();
while (done < count) {
  const batch = await consumer.fetch({ max_messages: 256, expires: 5000 });
  const messages = [];
  const publishes = [];
  for await (const message of batch) {
    const order = message.json();
    const email = formatEmail(message.subject, order, settings);
    const h = headers();
    h.set("Customer-Id", order.customer_id);
    publishes.push(
      js.publish(output, JSON.stringify(email), { headers: h, msgID: `peer:${message.seq}` }),
    );
    messages.push(message);
  }
  await Promise.all(publishes);
  for (const message of messages) {
    message.ack();
  }
  done += messages.length;
}
await nc.flush();
const seconds = (performance.now() - started) / 1000;
await nc.close();
console.log(JSON.stringify({ events: done, seconds }));
