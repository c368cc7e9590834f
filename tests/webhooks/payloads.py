"""LemonSqueezy webhook bodies in the shapes its documentation shows (orders, subscriptions,
subscription invoices), signed the way LemonSqueezy signs them."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

SECRET = "whsec-test-secret"
ONE_TIME_VARIANT = 111
SUBSCRIPTION_VARIANT = 222
CATALOG = json.dumps(
    {str(ONE_TIME_VARIANT): 1000, str(SUBSCRIPTION_VARIANT): {"tokens": 5000, "subscription": True}}
)


def sign(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


def _meta(event: str, user: str | None, test_mode: bool) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "test_mode": test_mode,
        "event_name": event,
        "webhook_id": "2f3e9e5a-7c1d-4f6e-9a51-0c9f0c6f8d11",
    }
    if user is not None:
        meta["custom_data"] = {"user_id": user}
    return meta


def order(
    event: str,
    order_id: int,
    user: str | None,
    variant_id: int = ONE_TIME_VARIANT,
    *,
    total: int = 999,
    refunded_amount: int = 0,
    test_mode: bool = False,
    currency: str = "USD",
    total_usd: int | None = None,
) -> dict[str, Any]:
    """`total_usd` defaults to the total (a USD order); give it for another currency."""
    refunded = refunded_amount > 0
    usd = total if total_usd is None else total_usd
    status = (
        "paid" if not refunded else ("refunded" if refunded_amount >= total else "partial_refund")
    )
    return {
        "meta": _meta(event, user, test_mode),
        "data": {
            "type": "orders",
            "id": str(order_id),
            "attributes": {
                "store_id": 1,
                "customer_id": 7,
                "identifier": "104e18a2-d755-4d4b-80c4-a6c1dcbe1c10",
                "order_number": order_id,
                "user_name": "Ada Lovelace",
                "user_email": "ada@example.com",
                "currency": currency,
                "currency_rate": "1.0000" if currency == "USD" else f"{usd / max(total, 1):.4f}",
                "subtotal": total,
                "discount_total": 0,
                "tax": 0,
                "total": total,
                "subtotal_usd": usd,
                "total_usd": usd,
                "tax_name": None,
                "tax_rate": "0.00",
                "status": status,
                "status_formatted": status.replace("_", " ").title(),
                "refunded": refunded,
                "refunded_at": "2026-11-25T10:00:00.000000Z" if refunded else None,
                "refunded_amount": refunded_amount,
                "subtotal_formatted": f"${total / 100:.2f}",
                "total_formatted": f"${total / 100:.2f}",
                "first_order_item": {
                    "id": order_id * 10,
                    "order_id": order_id,
                    "product_id": 5,
                    "variant_id": variant_id,
                    "price_id": 9,
                    "product_name": "rpcai tokens",
                    "variant_name": "1000 tokens",
                    "price": total,
                    "quantity": 1,
                    "created_at": "2026-11-25T09:00:00.000000Z",
                    "updated_at": "2026-11-25T09:00:00.000000Z",
                    "test_mode": test_mode,
                },
                "urls": {"receipt": "https://app.lemonsqueezy.com/my-orders/104e18a2"},
                "created_at": "2026-11-25T09:00:00.000000Z",
                "updated_at": "2026-11-25T09:00:00.000000Z",
                "test_mode": test_mode,
            },
            "relationships": {
                "store": {"links": {"related": "https://api.lemonsqueezy.com/v1/orders/1/store"}}
            },
            "links": {"self": f"https://api.lemonsqueezy.com/v1/orders/{order_id}"},
        },
    }


def subscription(
    event: str,
    subscription_id: int,
    user: str | None,
    status: str = "active",
    *,
    updated_at: str = "2026-11-25T09:00:00.000000Z",
    ends_at: str | None = None,
    variant_id: int = SUBSCRIPTION_VARIANT,
    test_mode: bool = False,
) -> dict[str, Any]:
    return {
        "meta": _meta(event, user, test_mode),
        "data": {
            "type": "subscriptions",
            "id": str(subscription_id),
            "attributes": {
                "store_id": 1,
                "customer_id": 7,
                "order_id": 900 + subscription_id,
                "order_item_id": 9000 + subscription_id,
                "product_id": 6,
                "variant_id": variant_id,
                "product_name": "rpcai monthly",
                "variant_name": "5000 tokens a month",
                "user_name": "Ada Lovelace",
                "user_email": "ada@example.com",
                "status": status,
                "status_formatted": status.replace("_", " ").title(),
                "card_brand": "visa",
                "card_last_four": "4242",
                "pause": None,
                "cancelled": status == "cancelled",
                "trial_ends_at": None,
                "billing_anchor": 25,
                "first_subscription_item": {
                    "id": 3,
                    "subscription_id": subscription_id,
                    "price_id": 10,
                    "quantity": 1,
                    "is_usage_based": False,
                },
                "urls": {
                    "update_payment_method": "https://app.lemonsqueezy.com/subscription/1/payment-details"
                },
                "renews_at": "2026-12-25T09:00:00.000000Z",
                "ends_at": ends_at,
                "created_at": "2026-11-25T09:00:00.000000Z",
                "updated_at": updated_at,
                "test_mode": test_mode,
            },
            "links": {"self": f"https://api.lemonsqueezy.com/v1/subscriptions/{subscription_id}"},
        },
    }


def invoice(
    invoice_id: int,
    subscription_id: int,
    user: str | None,
    billing_reason: str = "renewal",
    *,
    test_mode: bool = False,
    currency: str = "USD",
    total: int = 1999,
    total_usd: int | None = None,
) -> dict[str, Any]:
    """subscription_payment_success: note that its `data` is a subscription invoice (amounts in
    cents of `currency`, with their USD value in the *_usd fields)."""
    usd = total if total_usd is None else total_usd
    return {
        "meta": _meta("subscription_payment_success", user, test_mode),
        "data": {
            "type": "subscription-invoices",
            "id": str(invoice_id),
            "attributes": {
                "store_id": 1,
                "subscription_id": subscription_id,
                "customer_id": 7,
                "user_name": "Ada Lovelace",
                "user_email": "ada@example.com",
                "billing_reason": billing_reason,
                "card_brand": "visa",
                "card_last_four": "4242",
                "currency": currency,
                "currency_rate": "1.00000000",
                "status": "paid",
                "status_formatted": "Paid",
                "refunded": False,
                "refunded_at": None,
                "subtotal": total,
                "discount_total": 0,
                "tax": 0,
                "tax_inclusive": False,
                "total": total,
                "subtotal_usd": usd,
                "discount_total_usd": 0,
                "tax_usd": 0,
                "total_usd": usd,
                "urls": {"invoice_url": "https://app.lemonsqueezy.com/my-orders/invoice"},
                "created_at": "2026-11-25T09:00:00.000000Z",
                "updated_at": "2026-11-25T09:00:00.000000Z",
                "test_mode": test_mode,
            },
            "links": {
                "self": f"https://api.lemonsqueezy.com/v1/subscription-invoices/{invoice_id}"
            },
        },
    }


def refunded_invoice(
    invoice_id: int,
    subscription_id: int,
    user: str | None,
    billing_reason: str = "initial",
    *,
    refunded_amount: int = 1999,
    test_mode: bool = False,
) -> dict[str, Any]:
    """subscription_payment_refunded: the invoice as it stands after a refund (LemonSqueezy
    reports the refunded total so far, in minor units, out of the invoice's `total`)."""
    payload = invoice(invoice_id, subscription_id, user, billing_reason, test_mode=test_mode)
    payload["meta"]["event_name"] = "subscription_payment_refunded"
    attributes = payload["data"]["attributes"]
    status = "refunded" if refunded_amount >= attributes["total"] else "partial_refund"
    attributes.update(
        {
            "status": status,
            "status_formatted": status.replace("_", " ").title(),
            "refunded": True,
            "refunded_at": "2026-11-26T10:00:00.000000Z",
            "refunded_amount": refunded_amount,
            "updated_at": "2026-11-26T10:00:00.000000Z",
        }
    )
    return payload
