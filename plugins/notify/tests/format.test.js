// Unit tests of the formatting, with Node's own runner:
//   node --test plugins/notify/tests/
import { test } from "node:test";
import assert from "node:assert/strict";
import { formatEmail, problem } from "../format.js";

const config = { from: "orders@shop.example", recipientDomain: "customers.example" };

test("a placed order gets a thank-you email", () => {
  const order = { order_id: "7", customer_id: "ada", amount_cents: 1050, items: [{ sku: "mug", qty: 2 }] };
  const email = formatEmail("orders.placed", order, config);
  assert.equal(email.to, "ada@customers.example");
  assert.equal(email.subject, "Thanks for your order 7");
  assert.match(email.body, /2 x mug\) for EUR 10\.50/);
});

test("a backorder names what is missing", () => {
  const order = { order_id: "8", customer_id: "ken", shortages: [{ sku: "lamp", requested: 3, available: 0 }] };
  const email = formatEmail("inventory.backordered", order, config);
  assert.match(email.body, /lamp \(0 of 3 left\)/);
});

test("unknown subjects and anonymous orders are refused", () => {
  assert.match(problem("orders.cancelled", { order_id: "1", customer_id: "a" }), /no template/);
  assert.match(problem("orders.placed", { order_id: "1" }), /customer_id/);
  assert.equal(problem("orders.placed", { order_id: "1", customer_id: "a" }), null);
});
