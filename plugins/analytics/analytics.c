// Order analytics, a Weir plugin in C.
//
// Counts placed orders and revenue per country in the plugin's state and
// emits the running totals on `analytics.country` after each order, for
// dashboards downstream. Bindings come from `wit-bindgen c` (plugin.h);
// the build is in xtask/src/polyglot.rs and the guide in README.md.

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "plugin.h"

// Longest country code accepted: it becomes part of a state key.
#define MAX_COUNTRY 16

typedef struct {
    const uint8_t *ptr;
    size_t len;
} slice_t;

// The value after `"key":` in a flat JSON object, whitespace skipped, or
// an empty slice. Enough for the order events this plugin reads; nested
// objects with the same key names are not a concern for them.
static slice_t json_value(slice_t json, const char *key) {
    size_t key_len = strlen(key);
    for (size_t i = 0; i + key_len + 2 <= json.len; i++) {
        if (json.ptr[i] != '"' || memcmp(json.ptr + i + 1, key, key_len) != 0 ||
            json.ptr[i + 1 + key_len] != '"') {
            continue;
        }
        size_t j = i + key_len + 2;
        while (j < json.len && (json.ptr[j] == ' ' || json.ptr[j] == '\t')) j++;
        if (j >= json.len || json.ptr[j] != ':') continue;
        j++;
        while (j < json.len && (json.ptr[j] == ' ' || json.ptr[j] == '\t')) j++;
        return (slice_t){json.ptr + j, json.len - j};
    }
    return (slice_t){NULL, 0};
}

// A JSON string of letters, digits, '-' or '_' (no escapes), copied into
// `out`. Returns false for anything else.
static bool json_code(slice_t v, char out[MAX_COUNTRY + 1]) {
    if (v.len < 2 || v.ptr[0] != '"') return false;
    size_t n = 0;
    for (size_t i = 1; i < v.len; i++) {
        uint8_t c = v.ptr[i];
        if (c == '"') {
            out[n] = '\0';
            return n > 0;
        }
        bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
                  (c >= '0' && c <= '9') || c == '-' || c == '_';
        if (!ok || n == MAX_COUNTRY) return false;
        out[n++] = (char)c;
    }
    return false;
}

// A non-negative JSON integer. Returns false for anything else.
static bool json_u64(slice_t v, uint64_t *out) {
    uint64_t n = 0;
    size_t i = 0;
    for (; i < v.len && v.ptr[i] >= '0' && v.ptr[i] <= '9'; i++) {
        uint64_t digit = v.ptr[i] - '0';
        if (n > (UINT64_MAX - digit) / 10) return false;
        n = n * 10 + digit;
    }
    if (i == 0) return false;
    *out = n;
    return true;
}

static plugin_string_t str(const char *s) {
    plugin_string_t out;
    plugin_string_set(&out, s);
    return out;
}

static void log_line(weir_plugin_log_level_t level, const char *message) {
    plugin_string_t m = str(message);
    weir_plugin_log_log(level, &m);
}

// The counter under `key`, 0 when unset or unreadable.
static uint64_t counter_get(const char *key) {
    plugin_string_t k = str(key);
    plugin_list_u8_t value;
    uint64_t n = 0;
    if (weir_plugin_state_get(&k, &value)) {
        if (!json_u64((slice_t){value.ptr, value.len}, &n)) n = 0;
        plugin_list_u8_free(&value);
    }
    return n;
}

static bool counter_set(const char *key, uint64_t n) {
    char digits[24];
    int len = snprintf(digits, sizeof digits, "%" PRIu64, n);
    plugin_string_t k = str(key);
    plugin_list_u8_t v = {(uint8_t *)digits, (size_t)len};
    weir_plugin_state_limit_error_t err;
    if (weir_plugin_state_set(&k, &v, &err)) return true;
    weir_plugin_state_limit_error_free(&err);
    return false;
}

static bool fail(exports_weir_plugin_handler_error_t *err, uint8_t tag, const char *reason) {
    err->tag = tag;
    if (tag == WEIR_PLUGIN_TYPES_ERROR_REJECT) {
        plugin_string_dup(&err->val.reject, reason);
    } else {
        plugin_string_dup(&err->val.retry.reason, reason);
        err->val.retry.delay_ms.is_some = false;
    }
    return false;
}

bool exports_weir_plugin_handler_handle(exports_weir_plugin_handler_event_t *event,
                                        exports_weir_plugin_handler_error_t *err) {
    slice_t payload = {event->payload.ptr, event->payload.len};
    char country[MAX_COUNTRY + 1];
    uint64_t cents;
    bool valid = json_code(json_value(payload, "country"), country) &&
                 json_u64(json_value(payload, "amount_cents"), &cents);
    exports_weir_plugin_handler_event_free(event);
    if (!valid) {
        return fail(err, WEIR_PLUGIN_TYPES_ERROR_REJECT,
                    "not an order: needs \"country\" (a code) and \"amount_cents\" (>= 0)");
    }

    char orders_key[32 + MAX_COUNTRY], revenue_key[32 + MAX_COUNTRY];
    snprintf(orders_key, sizeof orders_key, "orders.%s", country);
    snprintf(revenue_key, sizeof revenue_key, "revenue.%s", country);
    uint64_t orders = counter_get(orders_key) + 1;
    uint64_t revenue = counter_get(revenue_key) + cents;
    if (!counter_set(orders_key, orders) || !counter_set(revenue_key, revenue)) {
        return fail(err, WEIR_PLUGIN_TYPES_ERROR_RETRY, "state write refused");
    }

    char body[128 + MAX_COUNTRY];
    int len = snprintf(body, sizeof body,
                       "{\"country\":\"%s\",\"orders\":%" PRIu64 ",\"revenue_cents\":%" PRIu64 "}",
                       country, orders, revenue);
    plugin_string_t subject = str("analytics.country");
    weir_plugin_emit_list_header_t headers = {NULL, 0};
    plugin_list_u8_t out = {(uint8_t *)body, (size_t)len};
    weir_plugin_emit_limit_error_t emit_err;
    if (!weir_plugin_emit_publish(&subject, &headers, &out, &emit_err)) {
        weir_plugin_emit_limit_error_free(&emit_err);
        return fail(err, WEIR_PLUGIN_TYPES_ERROR_RETRY, "emit refused");
    }
    if (orders % 1000 == 0) {
        char line[64 + MAX_COUNTRY];
        snprintf(line, sizeof line, "%" PRIu64 " orders from %s", orders, country);
        log_line(WEIR_PLUGIN_LOG_LEVEL_INFO, line);
    }
    return true;
}
