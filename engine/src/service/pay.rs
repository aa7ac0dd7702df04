//! Paying for a hold: `paying`, the charge, the durable purchase, `paid`; and the answers for a hold paid before.

use std::time::Duration;

use uuid::Uuid;

use super::{bump, hold_row, Engine, EngineError, Receipt};
use crate::core::{HoldState, HoldView, ReleaseReason, TransitionError};
use crate::payment::{ChargeOutcome, ChargeRequest};
use crate::store;
use crate::types::{Event, Purchase};
use crate::writer::WriteError;

/// The longest wait between reads of Postgres for a purchase whose batch's outcome is in doubt.
const IN_DOUBT_RETRY_MAX: Duration = Duration::from_secs(1);

/// Where a payment stands once it asked the gate for its hold.
enum Paying {
    /// The hold is `paying`: charge it.
    Hold(HoldView),
    /// The reservation was paid before: answer its purchase.
    PaidBefore,
}

impl Engine {
    /// Pays for a hold: `paying`, charge, durable purchase, `paid`. Paying a paid hold again answers the same
    /// purchase.
    pub async fn pay(
        &self,
        reservation: Uuid,
        member: Uuid,
        payment_token: &str,
    ) -> Result<Purchase, EngineError> {
        let Ok(_permit) = self.pay_permits.try_acquire() else {
            bump(&self.stats.rejected_overloaded);
            return Err(EngineError::Overloaded);
        };
        let drop = self.locate(reservation).await?;
        let spec = self.spec(drop).await?;
        let hold = match self.begin_paying(drop, reservation, member).await? {
            Paying::Hold(hold) => hold,
            Paying::PaidBefore => return self.paid_receipt(reservation, member).await,
        };
        let amount = spec.price.saturating_mul(i64::from(hold.quantity));
        let request = ChargeRequest {
            reservation_id: reservation,
            member_id: member,
            amount,
            currency: spec.currency.clone(),
            payment_token: payment_token.to_owned(),
        };
        self.charge(drop, &request).await?;
        let purchase = Purchase {
            id: Uuid::now_v7(),
            reservation_id: reservation,
            drop_id: drop,
            product_id: spec.product_id,
            member_id: member,
            quantity: hold.quantity,
            amount,
            currency: spec.currency.clone(),
            paid_at: self.now(),
        };
        let purchase = self.store_purchase(drop, purchase, &hold).await?;
        self.receipts.insert(reservation, Receipt::of(&purchase));
        // The purchase is durable from here on, so the answer is 200 whatever the gate says now. A gate that cannot
        // be reached leaves the hold `paying`, which no reaper expires; the gate settles it from Postgres later.
        match self.gate.complete_payment(drop, reservation).await {
            Ok(Ok(paid)) => debug_assert_eq!(paid.state, HoldState::Paid),
            Ok(Err(TransitionError::AlreadyPaid)) => {}
            Ok(Err(err)) => {
                tracing::error!(?err, %reservation, "stored purchase, but the gate refused to mark it paid")
            }
            Err(err) => {
                tracing::warn!(error = %err, %reservation, "stored purchase, gate not told yet")
            }
        }
        bump(&self.stats.payments);
        self.count(drop, Event::Paid, self.clock.now_ms());
        Ok(purchase)
    }

    /// Marks the hold `paying` in the gate, or says why it cannot be paid now (a hold paid before answers its
    /// purchase).
    async fn begin_paying(
        &self,
        drop: Uuid,
        reservation: Uuid,
        member: Uuid,
    ) -> Result<Paying, EngineError> {
        let now_ms = self.clock.now_ms();
        match self
            .gate
            .begin_payment(drop, reservation, member, now_ms)
            .await?
        {
            Ok(hold) => Ok(Paying::Hold(hold)),
            Err(TransitionError::AlreadyPaid) => Ok(Paying::PaidBefore),
            Err(TransitionError::NotFound) => {
                match self.settled_before_start(reservation, member).await? {
                    HoldState::Paid => Ok(Paying::PaidBefore),
                    HoldState::Released(reason) => Err(EngineError::AlreadyReleased(reason)),
                    HoldState::Held | HoldState::Paying => Err(EngineError::ReservationNotFound),
                }
            }
            Err(TransitionError::Expired) => {
                // begin_payment released it as expired; record that like the reaper would.
                bump(&self.stats.released_expired);
                self.count(drop, Event::Expired, now_ms);
                if let Some(view) = self.gate.hold(drop, reservation).await? {
                    self.queue_release(drop, &view, ReleaseReason::Expired, now_ms)
                        .await;
                }
                Err(EngineError::HoldExpired)
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Charges a `paying` hold, bounded by the payment timeout. Unless the charge is approved, the hold leaves
    /// `paying`: declined releases it, no answer (refunded, in case it went through late) or an unavailable gateway
    /// makes it `held` again for a retry.
    async fn charge(&self, drop: Uuid, request: &ChargeRequest) -> Result<(), EngineError> {
        let reservation = request.reservation_id;
        let Ok(outcome) =
            tokio::time::timeout(self.payment_timeout, self.gateway.charge(request)).await
        else {
            // No answer in time. The charge may yet go through at the gateway: refund it (refunds are idempotent on
            // the reservation), and the hold is `held` again for a retry.
            tracing::warn!(%reservation, timeout = ?self.payment_timeout, "payment gateway did not answer; giving the charge up");
            bump(&self.stats.payments_unavailable);
            self.gateway.refund(reservation).await;
            self.gate.abort_payment(drop, reservation).await??;
            return Err(EngineError::PaymentUnavailable);
        };
        match outcome {
            ChargeOutcome::Approved { .. } => Ok(()),
            ChargeOutcome::Declined => {
                bump(&self.stats.payments_declined);
                self.count(drop, Event::Declined, self.clock.now_ms());
                let released = self.gate.decline_payment(drop, reservation).await??;
                self.queue_release(
                    drop,
                    &released,
                    ReleaseReason::PaymentDeclined,
                    self.clock.now_ms(),
                )
                .await;
                Err(EngineError::PaymentDeclined)
            }
            ChargeOutcome::Unavailable => {
                bump(&self.stats.payments_unavailable);
                self.gate.abort_payment(drop, reservation).await??;
                Err(EngineError::PaymentUnavailable)
            }
        }
    }

    /// Stores a charged purchase and returns it as stored: if an earlier attempt at this reservation (on any
    /// instance) stored one first, that one is the purchase, and its id is the one answered. A purchase that is not
    /// stored has its charge refunded.
    async fn store_purchase(
        &self,
        drop: Uuid,
        purchase: Purchase,
        hold: &HoldView,
    ) -> Result<Purchase, EngineError> {
        let reservation = purchase.reservation_id;
        match self.writer.purchase(purchase, hold_row(drop, hold)).await {
            Ok(stored) => Ok(stored),
            Err(WriteError::Fenced) => {
                // Postgres refused it (guarantee 5a): this payment outlived its lease and the hold's release is stored
                // (its units may be another buyer's by now), or the drop's stored paid units are at its stock. Give
                // the charge back, and make sure the gate no longer counts the hold (a no-op when it was released).
                bump(&self.stats.payments_fenced);
                tracing::warn!(%reservation, "purchase refused by Postgres (the hold no longer owns its units); refunding");
                self.gateway.refund(reservation).await;
                match self.gate.release_fenced(drop, reservation).await? {
                    Ok(released) => {
                        bump(&self.stats.released_expired);
                        self.count(drop, Event::Expired, self.clock.now_ms());
                        self.queue_release(
                            drop,
                            &released,
                            ReleaseReason::Expired,
                            self.clock.now_ms(),
                        )
                        .await;
                    }
                    Err(TransitionError::AlreadyReleased(_)) => {}
                    Err(err) => {
                        tracing::error!(?err, %reservation, "a fenced payment's hold could not be released in the gate")
                    }
                }
                Err(EngineError::HoldExpired)
            }
            Err(WriteError::InDoubt(err)) => {
                // The batch's COMMIT may have reached Postgres before its connection failed: Postgres decides, not
                // the error. Until it can be read the charge is kept and the hold stays `paying` (on Redis its lease
                // then settles it from Postgres the same way, should this process stop).
                tracing::error!(error = %err, %reservation, "purchase may or may not be stored; reading Postgres");
                if let Some(stored) = self.purchase_once_readable(reservation).await {
                    tracing::warn!(%reservation, "purchase stored although its batch failed");
                    return Ok(stored);
                }
                tracing::error!(%reservation, "purchase not stored; refunding");
                self.gateway.refund(reservation).await;
                self.gate.abort_payment(drop, reservation).await??;
                Err(EngineError::StorageUnavailable(WriteError::InDoubt(err)))
            }
            Err(err) => {
                // Not durable, so not paid: give the charge back and the hold returns to `held` for a retry.
                tracing::error!(error = %err, %reservation, "purchase not stored; refunding");
                self.gateway.refund(reservation).await;
                self.gate.abort_payment(drop, reservation).await??;
                Err(EngineError::StorageUnavailable(err))
            }
        }
    }

    /// The purchase stored for `reservation`, or `None` when there is none, read from Postgres as soon as it
    /// answers (retried meanwhile, at most every `IN_DOUBT_RETRY_MAX`).
    async fn purchase_once_readable(&self, reservation: Uuid) -> Option<Purchase> {
        let mut backoff = Duration::from_millis(50);
        loop {
            let read = match self.db.get().await {
                Ok(client) => store::purchase_by_reservation(&**client, reservation)
                    .await
                    .map_err(EngineError::from),
                Err(err) => Err(EngineError::from(err)),
            };
            match read {
                Ok(stored) => return stored,
                Err(err) => {
                    tracing::warn!(error = %err, %reservation, "Postgres not readable yet; a purchase's outcome waits on it");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(IN_DOUBT_RETRY_MAX);
                }
            }
        }
    }

    /// The purchase of a paid reservation, for its owner: paying again answers the same purchase.
    async fn paid_receipt(&self, reservation: Uuid, member: Uuid) -> Result<Purchase, EngineError> {
        let purchase = self.receipt(reservation).await?;
        if purchase.member_id != member {
            return Err(EngineError::NotOwner);
        }
        Ok(purchase)
    }

    /// The stored state of a reservation the gate does not know, for its owner, so that a client retrying a payment
    /// across a restart gets the same purchase rather than a 404.
    pub(super) async fn settled_before_start(
        &self,
        reservation: Uuid,
        member: Uuid,
    ) -> Result<HoldState, EngineError> {
        let stored = self.stored(reservation).await?;
        if stored.member_id != member {
            return Err(EngineError::NotOwner);
        }
        Ok(stored.state)
    }
}
