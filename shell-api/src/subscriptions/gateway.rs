//! Card charges of subscriptions: through the engine's `PaymentGateway`, each on its charge id as the idempotency
//! key, and each decision recorded by key in `gateway_charges`.
//!
//! Why a table: the guarantee "a renewer killed between the gateway's approval and its commit is re-run and
//! charges nothing twice" rests on the gateway answering a repeated key with its first answer. A real gateway keeps
//! that record on its side; the bundled `SimulatedGateway` keeps it in process memory, which dies with the process
//! the test kills and is not shared by two instances. `gateway_charges` is that record made durable and shared: the
//! key is looked up before the gateway is asked, and a decision is written (first writer wins) before it is
//! answered, so a repeated key gets the first decision whichever process asks. It is also where tests count the
//! charges the gateway approved. It is written outside the renewal's transaction, as a gateway's record would be:
//! a rolled-back renewal does not unmake a charge.

use deadpool_postgres::GenericClient;
use engine::payment::{ChargeOutcome, ChargeRequest, PaymentGateway};

use crate::error::ApiError;

/// Charges `request` once per `request.reservation_id` (the charge id). `Unavailable` is not a decision and is not
/// recorded: asking again may approve or decline.
pub async fn charge(
    client: &impl GenericClient,
    gateway: &dyn PaymentGateway,
    request: &ChargeRequest,
) -> Result<ChargeOutcome, ApiError> {
    let key = request.reservation_id;
    let recorded = client
        .query_opt(
            "UPDATE gateway_charges SET times_asked = times_asked + 1 WHERE charge_key = $1 RETURNING outcome",
            &[&key],
        )
        .await?;
    if let Some(row) = recorded {
        return Ok(outcome(row.get(0), key));
    }
    let decided = match gateway.charge(request).await {
        ChargeOutcome::Approved { .. } => "approved",
        ChargeOutcome::Declined => "declined",
        ChargeOutcome::Unavailable => return Ok(ChargeOutcome::Unavailable),
    };
    client
        .execute(
            "INSERT INTO gateway_charges (charge_key, member_id, amount, currency, outcome)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (charge_key) DO NOTHING",
            &[
                &key,
                &request.member_id,
                &request.amount,
                &request.currency,
                &decided,
            ],
        )
        .await?;
    // Another process asking with the same key at the same moment may have written first: its decision stands.
    let row = client
        .query_one(
            "SELECT outcome FROM gateway_charges WHERE charge_key = $1",
            &[&key],
        )
        .await?;
    Ok(outcome(row.get(0), key))
}

/// Gives an approved charge back (the subscription it paid for could not be stored), once.
pub async fn refund(
    client: &impl GenericClient,
    gateway: &dyn PaymentGateway,
    key: uuid::Uuid,
) -> Result<(), ApiError> {
    gateway.refund(key).await;
    client
        .execute(
            "UPDATE gateway_charges SET refunded = true WHERE charge_key = $1 AND outcome = 'approved'",
            &[&key],
        )
        .await?;
    Ok(())
}

fn outcome(text: &str, key: uuid::Uuid) -> ChargeOutcome {
    match text {
        "approved" => ChargeOutcome::Approved {
            charge_id: format!("ch_{}", key.simple()),
        },
        _ => ChargeOutcome::Declined,
    }
}
