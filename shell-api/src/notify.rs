//! Writing notifications, the plumbing every area may use (API.md, "Live": notifications): the kinds, and
//! `notify_members`, which writes one row per member in the caller's transaction. Reading, listing and streaming them
//! is the `live` area's (`live/notifications.rs`), which also writes the hearts' drop notices itself. Each kind's
//! once-per-member-and-event rule is a unique index in its area's migration; every insert here is ON CONFLICT DO
//! NOTHING, so a retry, a second instance or a crash and re-run writes nothing twice.

use deadpool_postgres::GenericClient;
use uuid::Uuid;

use crate::error::ApiError;

/// The kinds of notification (the `kind` field; migration 0015 lists them in its checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    DropScheduled,
    DropOpen,
    Restock,
    RefundDecided,
    DrawWon,
    DrawLost,
    CampaignFunded,
    CampaignUnfunded,
    Shipped,
    SubscriptionRenewed,
    SubscriptionPaymentFailed,
    SubscriptionChanged,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::DropScheduled => "drop_scheduled",
            Kind::DropOpen => "drop_open",
            Kind::Restock => "restock",
            Kind::RefundDecided => "refund_decided",
            Kind::DrawWon => "draw_won",
            Kind::DrawLost => "draw_lost",
            Kind::CampaignFunded => "campaign_funded",
            Kind::CampaignUnfunded => "campaign_unfunded",
            Kind::Shipped => "shipped",
            Kind::SubscriptionRenewed => "subscription_renewed",
            Kind::SubscriptionPaymentFailed => "subscription_payment_failed",
            Kind::SubscriptionChanged => "subscription_changed",
        }
    }
}

/// What a notification is about: the references its kind needs (see migration 0015's shape check).
#[derive(Debug, Clone, Copy, Default)]
pub struct About {
    pub drop_id: Option<Uuid>,
    pub product_id: Option<Uuid>,
    pub purchase_id: Option<Uuid>,
    pub subscription_id: Option<Uuid>,
}

/// Tells each of `members` `kind` about `about`, one row each, ON CONFLICT DO NOTHING: the kind's own unique index
/// (in its area's migration) is what makes it once per member and event across instances and retries. Call it in
/// the transaction that makes the event true, so the notifications exist exactly when the event does; open
/// streams pick the rows up on the notifier's next tick. Returns how many were written.
pub async fn notify_members(
    client: &impl GenericClient,
    kind: Kind,
    members: &[Uuid],
    about: About,
) -> Result<u64, ApiError> {
    if members.is_empty() {
        return Ok(0);
    }
    let ids: Vec<Uuid> = members.iter().map(|_| Uuid::now_v7()).collect();
    let written = client
        .execute(
            "INSERT INTO notifications (id, member_id, kind, drop_id, product_id, purchase_id, subscription_id)
             SELECT id, member_id, $3, $4, $5, $6, $7 FROM UNNEST($1::uuid[], $2::uuid[]) AS t (id, member_id)
             ON CONFLICT DO NOTHING",
            &[
                &ids,
                &members,
                &kind.as_str(),
                &about.drop_id,
                &about.product_id,
                &about.purchase_id,
                &about.subscription_id,
            ],
        )
        .await?;
    Ok(written)
}
