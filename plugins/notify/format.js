// Email formatting for the notify plugin: pure functions, no host
// imports, so they run under `node --test` as well as in the component.

function euros(cents) {
  return (cents / 100).toFixed(2);
}

function items(order) {
  return (order.items ?? []).map((i) => `${i.qty} x ${i.sku}`).join(", ");
}

const templates = {
  "orders.placed": (order) => ({
    subject: `Thanks for your order ${order.order_id}`,
    body:
      `Hello ${order.customer_id},\n\n` +
      `we received your order ${order.order_id} (${items(order)}) ` +
      `for EUR ${euros(order.amount_cents)}. We will let you know when it ships.\n`,
  }),
  "inventory.backordered": (order) => ({
    subject: `Order ${order.order_id} is delayed`,
    body:
      `Hello ${order.customer_id},\n\n` +
      `part of your order ${order.order_id} is out of stock: ` +
      (order.shortages ?? [])
        .map((s) => `${s.sku} (${s.available} of ${s.requested} left)`)
        .join(", ") +
      `. We will ship it as soon as it is back.\n`,
  }),
};

/// Why `order` on `subject` cannot be formatted, or null if it can.
export function problem(subject, order) {
  if (!templates[subject]) {
    return `no template for subject ${subject}`;
  }
  if (typeof order?.order_id !== "string" || typeof order?.customer_id !== "string") {
    return "no order_id or customer_id";
  }
  return null;
}

/// The email for `order`, which arrived on `subject`.
export function formatEmail(subject, order, { from, recipientDomain }) {
  const { subject: title, body } = templates[subject](order);
  return {
    to: `${order.customer_id}@${recipientDomain}`,
    from,
    subject: title,
    body,
    order_id: order.order_id,
  };
}
