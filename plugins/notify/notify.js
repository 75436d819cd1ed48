// Order notifications, a Weir plugin in JavaScript.
//
// Formats a customer email for every placed order and for every
// backordered one, and emits it on `notifications.email` for a mail
// sender to deliver. The sender address and the recipients' domain come
// from the manifest's [config].
import { publish } from "weir:plugin/emit@0.1.0";
import { get as configGet } from "weir:plugin/config@0.1.0";
import { log } from "weir:plugin/log@0.1.0";
import { formatEmail, problem } from "./format.js";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

// componentize-js turns a thrown value into the WIT `result`'s error; a
// variant is `{ tag, val }`.
function reject(reason) {
  return { tag: "reject", val: reason };
}

export const handler = {
  handle(event) {
    let order;
    try {
      order = JSON.parse(decoder.decode(event.payload));
    } catch (e) {
      throw reject(`event ${event.id} is not JSON: ${e.message}`);
    }
    const why = problem(event.subject, order);
    if (why) {
      throw reject(`event ${event.id}: ${why}`);
    }
    const email = formatEmail(event.subject, order, {
      from: configGet("from") ?? "orders@example.com",
      recipientDomain: configGet("recipient-domain") ?? "example.com",
    });
    publish(
      "notifications.email",
      [{ key: "Customer-Id", value: order.customer_id }],
      encoder.encode(JSON.stringify(email)),
    );
    log("debug", `email for order ${order.order_id} to ${email.to}`);
  },
};
