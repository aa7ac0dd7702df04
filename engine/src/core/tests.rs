//! Unit tests of `DropBook`: every transition and refusal, where units sit between shards, the sold-out flag, the
//! reaper and restore. The proptest model check against a single-lock reference is in `engine/tests/core_model.rs`.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on the first unexpected refusal"
)]

use super::*;
use uuid::Uuid;

const HOLD_MS: i64 = 1_000;
const T0: i64 = 1_700_000_000_000;

fn book(stock: u32, per_member_limit: u32, shards: usize) -> DropBook {
    DropBook::new(DropParams {
        stock,
        per_member_limit,
        hold_ms: HOLD_MS,
        shards,
    })
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

/// The `nth` member (counting from 0) whose home shard is `home`.
fn member_at(book: &DropBook, home: usize, nth: usize) -> Uuid {
    (1u128..)
        .map(|n| id(n << 64 | 0xabcd))
        .filter(|member| book.home_of(*member) == home)
        .nth(nth)
        .unwrap()
}

fn state_of(book: &DropBook, hold: Uuid) -> Option<HoldState> {
    book.hold(hold).map(|hold| hold.state)
}

fn counts(stock: u32, available: u32, held: u32, paid: u32) -> Counts {
    Counts {
        stock,
        available,
        held,
        paid,
    }
}

#[test]
fn reserve_holds_units_on_the_home_shard() {
    let book = book(10, 3, 4);
    let member = id(7);
    let hold = book.reserve(id(1), member, 2, T0).unwrap();
    assert_eq!(
        hold,
        HoldView {
            id: hold.id,
            member,
            quantity: 2,
            state: HoldState::Held,
            created_at_ms: T0,
            expires_at_ms: T0 + HOLD_MS,
        }
    );
    assert_eq!(book.hold(hold.id), Some(hold));
    assert_eq!(book.counts(), counts(10, 8, 2, 0));
    assert_eq!(book.member_units(member), 2);
    assert_eq!(book.member_units(id(8)), 0);
    let home = book.home_of(member);
    assert_eq!(book.place_of(hold.id), Some((home, 0)));
    let (assigned, available, held, paid) = book.shard_counts()[home];
    assert_eq!(
        (held, paid),
        (2, 0),
        "the units are taken from the home shard"
    );
    assert_eq!(assigned, available + 2);
    assert!(!book.is_sold_out());
}

#[test]
fn invalid_quantity_is_refused_before_anything_else() {
    let book = book(10, 3, 2);
    assert_eq!(
        book.reserve(id(1), id(7), 0, T0),
        Err(ReserveRejection::InvalidQuantity)
    );
    assert_eq!(
        book.reserve(id(1), id(7), 4, T0),
        Err(ReserveRejection::InvalidQuantity)
    );
    assert_eq!(book.counts(), counts(10, 10, 0, 0));
    assert_eq!(book.member_units(id(7)), 0);
    assert_eq!(book.hold(id(1)), None);
}

#[test]
fn member_limit_counts_held_paying_and_paid_units() {
    let book = book(10, 3, 2);
    let (alice, bob) = (id(7), id(8));
    let h1 = book.reserve(id(1), alice, 2, T0).unwrap().id;
    assert_eq!(
        book.reserve(id(2), alice, 2, T0),
        Err(ReserveRejection::LimitExceeded)
    );
    book.reserve(id(3), bob, 3, T0).unwrap();
    let h4 = book.reserve(id(4), alice, 1, T0).unwrap().id;
    assert_eq!(book.member_units(alice), 3);
    assert_eq!(
        book.reserve(id(5), alice, 1, T0),
        Err(ReserveRejection::LimitExceeded)
    );

    // Paying units count.
    book.begin_payment(h4, alice, T0).unwrap();
    assert_eq!(
        book.reserve(id(5), alice, 1, T0),
        Err(ReserveRejection::LimitExceeded)
    );
    // Released units come back to the member, paid ones keep counting.
    book.cancel(h1, alice).unwrap();
    assert_eq!(book.member_units(alice), 1);
    book.complete_payment(h4).unwrap();
    assert_eq!(book.member_units(alice), 1);
    book.reserve(id(5), alice, 2, T0).unwrap();
    assert_eq!(
        book.reserve(id(6), alice, 1, T0),
        Err(ReserveRejection::LimitExceeded)
    );
    assert_eq!(book.counts(), counts(10, 4, 5, 1));
}

#[test]
fn the_same_seed_twice_makes_two_holds() {
    let book = book(10, 3, 4);
    let (alice, bob) = (id(7), id(8));
    let first = book.reserve(id(1), alice, 2, T0).unwrap();
    let second = book.reserve(id(1), bob, 1, T0 + 10).unwrap();
    let third = book.reserve(id(1), alice, 1, T0 + 10).unwrap();
    assert_ne!(first.id, second.id);
    assert_ne!(first.id, third.id);
    assert_ne!(second.id, third.id);
    assert_eq!(book.counts(), counts(10, 6, 4, 0));
    assert_eq!(book.member_units(alice), 3);
    assert_eq!(book.hold(first.id), Some(first));
    assert_eq!(book.hold(second.id), Some(second));
    assert_eq!(book.hold(third.id), Some(third));
    assert_eq!(book.place_of(third.id), Some((book.home_of(alice), 1)));

    // Each is released once, when it is due.
    let mut out = Vec::new();
    assert_eq!(book.reap(T0 + HOLD_MS - 1, &mut out), 0);
    assert_eq!(book.reap(T0 + HOLD_MS, &mut out), 1);
    assert_eq!(out[0].id, first.id);
    assert_eq!(book.reap(T0 + HOLD_MS + 10, &mut out), 2);
    assert_eq!(book.reap(T0 + HOLD_MS + 10, &mut out), 0);
    assert_eq!(book.counts(), counts(10, 10, 0, 0));
}

#[test]
fn an_empty_home_shard_takes_units_from_another_shard() {
    let book = book(2, 1, 2);
    assert_eq!(book.shard_counts(), vec![(1, 1, 0, 0), (1, 1, 0, 0)]);
    let first = member_at(&book, 0, 0);
    let second = member_at(&book, 0, 1);
    let h1 = book.reserve(id(1), first, 1, T0).unwrap().id;
    let h2 = book.reserve(id(2), second, 1, T0).unwrap().id;
    assert_eq!(book.place_of(h1), Some((0, 0)));
    assert_eq!(
        book.place_of(h2),
        Some((0, 1)),
        "the other shard's unit moved into the home shard"
    );
    assert_eq!(book.shard_counts(), vec![(2, 0, 2, 0), (0, 0, 0, 0)]);

    // Every later transition adjusts the shard the hold is charged to.
    book.begin_payment(h2, second, T0).unwrap();
    book.complete_payment(h2).unwrap();
    book.cancel(h1, first).unwrap();
    assert_eq!(book.shard_counts(), vec![(2, 1, 0, 1), (0, 0, 0, 0)]);
}

#[test]
fn a_quantity_no_single_shard_has_is_rebalanced_into_the_home_shard() {
    let book = book(4, 4, 4);
    let buyer = member_at(&book, 2, 0);
    let h1 = book.reserve(id(1), buyer, 3, T0).unwrap().id;
    assert_eq!(book.place_of(h1), Some((2, 0)));
    let shards = book.shard_counts();
    assert_eq!(
        shards[2],
        (3, 0, 3, 0),
        "two units moved into the home shard"
    );
    assert_eq!(shards.iter().map(|shard| shard.0).sum::<u32>(), 4);
    assert_eq!(shards.iter().map(|shard| shard.1).sum::<u32>(), 1);

    // The one unit left is still sellable, to anyone.
    book.reserve(id(2), member_at(&book, 2, 1), 1, T0).unwrap();
    assert_eq!(book.counts(), counts(4, 0, 4, 0));
    book.cancel(h1, buyer).unwrap();
    assert_eq!(book.counts(), counts(4, 3, 1, 0));
    book.reserve(id(3), member_at(&book, 0, 0), 3, T0).unwrap();
    assert_eq!(book.counts(), counts(4, 0, 4, 0));
}

#[test]
fn the_last_units_are_sellable_from_every_home_shard() {
    for shards in [1, 2, 4, 8] {
        for home in 0..shards {
            // One unit, which sits in shard 0.
            let single = book(1, 1, shards);
            let member = member_at(&single, home, 0);
            assert!(
                single.reserve(id(1), member, 1, T0).is_ok(),
                "{shards} shards, home {home}"
            );
            assert_eq!(single.counts(), counts(1, 0, 1, 0));

            // Three units on three different shards (or fewer shards), bought at once.
            let spread = book(3, 3, shards);
            let member = member_at(&spread, home, 0);
            assert!(
                spread.reserve(id(1), member, 3, T0).is_ok(),
                "{shards} shards, home {home}"
            );
            assert_eq!(spread.counts(), counts(3, 0, 3, 0));
            assert_eq!(
                spread.reserve(id(2), id(99), 1, T0),
                Err(ReserveRejection::SoldOut)
            );
            assert!(spread.is_sold_out());
        }
    }
}

#[test]
fn a_quantity_above_what_is_available_is_sold_out_without_setting_the_flag() {
    let book = book(3, 3, 4);
    book.reserve(id(1), id(7), 2, T0).unwrap();
    assert_eq!(
        book.reserve(id(2), id(8), 2, T0),
        Err(ReserveRejection::SoldOut)
    );
    assert!(!book.is_sold_out(), "one unit is still available");
    book.reserve(id(3), id(8), 1, T0).unwrap();
    assert_eq!(book.counts(), counts(3, 0, 3, 0));
}

/// Sells the only unit (to member 7, returning its hold's id), then lets a second buyer find it gone, which sets the
/// flag.
fn sold_out_book() -> (DropBook, Uuid) {
    let book = book(1, 2, 4);
    let h1 = book.reserve(id(1), id(7), 1, T0).unwrap().id;
    assert!(
        !book.is_sold_out(),
        "the flag is set by the first refused reservation"
    );
    assert_eq!(
        book.reserve(id(2), id(8), 1, T0),
        Err(ReserveRejection::SoldOut)
    );
    assert!(book.is_sold_out());
    (book, h1)
}

#[test]
fn the_sold_out_flag_refuses_at_once_and_clears_on_cancel() {
    let (book, h1) = sold_out_book();
    assert_eq!(
        book.reserve(id(3), id(9), 1, T0),
        Err(ReserveRejection::SoldOut)
    );
    // The flag is checked before the member limit (no lock is taken), but after the quantity.
    assert_eq!(
        book.reserve(id(3), id(7), 2, T0),
        Err(ReserveRejection::SoldOut)
    );
    assert_eq!(
        book.reserve(id(3), id(7), 3, T0),
        Err(ReserveRejection::InvalidQuantity)
    );
    assert_eq!(book.member_units(id(9)), 0);

    book.cancel(h1, id(7)).unwrap();
    assert!(!book.is_sold_out());
    book.reserve(id(3), id(9), 1, T0).unwrap();
}

#[test]
fn the_sold_out_flag_clears_on_expiry() {
    let (book, _) = sold_out_book();
    let mut out = Vec::new();
    assert_eq!(book.reap(T0 + HOLD_MS, &mut out), 1);
    assert!(!book.is_sold_out());
    book.reserve(id(3), id(9), 1, T0 + HOLD_MS).unwrap();
}

#[test]
fn the_sold_out_flag_clears_on_expiry_found_by_begin_payment() {
    let (book, h1) = sold_out_book();
    assert_eq!(
        book.begin_payment(h1, id(7), T0 + HOLD_MS),
        Err(TransitionError::Expired)
    );
    assert!(!book.is_sold_out());
}

#[test]
fn the_sold_out_flag_clears_on_decline() {
    let (book, h1) = sold_out_book();
    book.begin_payment(h1, id(7), T0).unwrap();
    assert!(book.is_sold_out(), "paying units are still taken");
    book.decline_payment(h1).unwrap();
    assert!(!book.is_sold_out());
    assert_eq!(book.counts(), counts(1, 1, 0, 0));
}

#[test]
fn the_sold_out_flag_stays_after_payment() {
    let (book, h1) = sold_out_book();
    book.begin_payment(h1, id(7), T0).unwrap();
    book.complete_payment(h1).unwrap();
    assert!(book.is_sold_out());
    assert_eq!(book.counts(), counts(1, 0, 0, 1));
}

#[test]
fn a_drop_with_no_stock_starts_sold_out() {
    let book = book(0, 1, 2);
    assert!(book.is_sold_out());
    assert_eq!(
        book.reserve(id(1), id(7), 1, T0),
        Err(ReserveRejection::SoldOut)
    );
    assert_eq!(book.counts(), counts(0, 0, 0, 0));
}

#[test]
fn payment_moves_held_to_paying_to_paid() {
    let book = book(5, 2, 2);
    let alice = id(7);
    let h1 = book.reserve(id(1), alice, 2, T0).unwrap().id;
    let paying = book.begin_payment(h1, alice, T0 + 1).unwrap();
    assert_eq!(paying.state, HoldState::Paying);
    assert_eq!(
        book.counts(),
        counts(5, 3, 2, 0),
        "paying units count as held"
    );
    let paid = book.complete_payment(h1).unwrap();
    assert_eq!(paid.state, HoldState::Paid);
    assert_eq!(paid.expires_at_ms, T0 + HOLD_MS);
    assert_eq!(book.counts(), counts(5, 3, 0, 2));
    assert_eq!(book.member_units(alice), 2);

    // A paid hold refuses every further transition, and the reaper leaves it alone.
    assert_eq!(
        book.begin_payment(h1, alice, T0),
        Err(TransitionError::AlreadyPaid)
    );
    assert_eq!(book.complete_payment(h1), Err(TransitionError::AlreadyPaid));
    assert_eq!(book.abort_payment(h1), Err(TransitionError::AlreadyPaid));
    assert_eq!(book.decline_payment(h1), Err(TransitionError::AlreadyPaid));
    assert_eq!(book.cancel(h1, alice), Err(TransitionError::AlreadyPaid));
    assert_eq!(book.reap(T0 + 10 * HOLD_MS, &mut Vec::new()), 0);
    assert_eq!(book.counts(), counts(5, 3, 0, 2));
    assert_eq!(state_of(&book, h1), Some(HoldState::Paid));
}

#[test]
fn a_payment_that_completes_after_expiry_still_counts() {
    // Two-phase: once paying, the hold is not expired under the payment call.
    let book = book(5, 2, 2);
    let h1 = book.reserve(id(1), id(7), 1, T0).unwrap().id;
    book.begin_payment(h1, id(7), T0 + HOLD_MS - 1).unwrap();
    assert_eq!(book.reap(T0 + 5 * HOLD_MS, &mut Vec::new()), 0);
    assert_eq!(
        book.complete_payment(h1).map(|hold| hold.state),
        Ok(HoldState::Paid)
    );
    assert_eq!(book.reap(T0 + 6 * HOLD_MS, &mut Vec::new()), 0);
    assert_eq!(book.counts(), counts(5, 4, 0, 1));
}

#[test]
fn only_the_owner_may_pay_or_cancel() {
    let book = book(5, 2, 2);
    let h1 = book.reserve(id(1), id(7), 1, T0).unwrap().id;
    assert_eq!(
        book.begin_payment(h1, id(8), T0),
        Err(TransitionError::NotOwner)
    );
    assert_eq!(book.cancel(h1, id(8)), Err(TransitionError::NotOwner));
    // Not even whether it expired is revealed to another member.
    assert_eq!(
        book.begin_payment(h1, id(8), T0 + HOLD_MS),
        Err(TransitionError::NotOwner)
    );
    assert_eq!(state_of(&book, h1), Some(HoldState::Held));
}

#[test]
fn unknown_holds_are_not_found() {
    let book = book(5, 2, 2);
    assert_eq!(
        book.begin_payment(id(1), id(7), T0),
        Err(TransitionError::NotFound)
    );
    assert_eq!(book.complete_payment(id(1)), Err(TransitionError::NotFound));
    assert_eq!(book.abort_payment(id(1)), Err(TransitionError::NotFound));
    assert_eq!(book.decline_payment(id(1)), Err(TransitionError::NotFound));
    assert_eq!(book.cancel(id(1), id(7)), Err(TransitionError::NotFound));
}

#[test]
fn payment_calls_need_a_paying_hold() {
    let book = book(5, 2, 2);
    let h1 = book.reserve(id(1), id(7), 1, T0).unwrap().id;
    assert_eq!(book.complete_payment(h1), Err(TransitionError::NotPaying));
    assert_eq!(book.abort_payment(h1), Err(TransitionError::NotPaying));
    assert_eq!(book.decline_payment(h1), Err(TransitionError::NotPaying));
    book.begin_payment(h1, id(7), T0).unwrap();
    assert_eq!(
        book.begin_payment(h1, id(7), T0),
        Err(TransitionError::PaymentInFlight)
    );
    assert_eq!(
        book.cancel(h1, id(7)),
        Err(TransitionError::PaymentInFlight)
    );
    assert_eq!(book.counts(), counts(5, 4, 1, 0));
}

#[test]
fn cancel_releases_once() {
    let book = book(5, 2, 2);
    let h1 = book.reserve(id(1), id(7), 2, T0).unwrap().id;
    let cancelled = book.cancel(h1, id(7)).unwrap();
    assert_eq!(
        cancelled.state,
        HoldState::Released(ReleaseReason::Cancelled)
    );
    assert_eq!(book.counts(), counts(5, 5, 0, 0));
    assert_eq!(book.member_units(id(7)), 0);
    let again = Err(TransitionError::AlreadyReleased(ReleaseReason::Cancelled));
    assert_eq!(book.cancel(h1, id(7)), again);
    assert_eq!(book.begin_payment(h1, id(7), T0), again);
    assert_eq!(book.complete_payment(h1), again);
    assert_eq!(book.abort_payment(h1), again);
    assert_eq!(book.decline_payment(h1), again);
    assert_eq!(book.reap(T0 + HOLD_MS, &mut Vec::new()), 0);
    assert_eq!(book.counts(), counts(5, 5, 0, 0));
}

#[test]
fn abort_returns_a_paying_hold_to_held_with_its_expiry() {
    let book = book(5, 2, 2);
    let h1 = book.reserve(id(1), id(7), 1, T0).unwrap().id;
    book.begin_payment(h1, id(7), T0 + 10).unwrap();
    let held = book.abort_payment(h1).unwrap();
    assert_eq!(held.state, HoldState::Held);
    assert_eq!(held.expires_at_ms, T0 + HOLD_MS);
    // It can be paid again, or cancelled.
    book.begin_payment(h1, id(7), T0 + 20).unwrap();
    book.abort_payment(h1).unwrap();
    book.cancel(h1, id(7)).unwrap();
    assert_eq!(book.counts(), counts(5, 5, 0, 0));
}

#[test]
fn decline_releases_a_paying_hold() {
    let book = book(5, 2, 2);
    let h1 = book.reserve(id(1), id(7), 2, T0).unwrap().id;
    book.begin_payment(h1, id(7), T0).unwrap();
    let declined = book.decline_payment(h1).unwrap();
    assert_eq!(
        declined.state,
        HoldState::Released(ReleaseReason::PaymentDeclined)
    );
    assert_eq!(book.counts(), counts(5, 5, 0, 0));
    assert_eq!(book.member_units(id(7)), 0);
    assert_eq!(
        book.complete_payment(h1),
        Err(TransitionError::AlreadyReleased(
            ReleaseReason::PaymentDeclined
        )),
        "a released hold is never paid"
    );
}

#[test]
fn begin_payment_at_or_after_expiry_releases_the_hold_as_expired() {
    let book = book(5, 2, 2);
    let h1 = book.reserve(id(1), id(7), 2, T0).unwrap().id;
    assert_eq!(
        book.begin_payment(h1, id(7), T0 + HOLD_MS),
        Err(TransitionError::Expired)
    );
    assert_eq!(
        state_of(&book, h1),
        Some(HoldState::Released(ReleaseReason::Expired))
    );
    assert_eq!(book.counts(), counts(5, 5, 0, 0));
    assert_eq!(book.member_units(id(7)), 0);
    assert_eq!(
        book.begin_payment(h1, id(7), T0 + HOLD_MS),
        Err(TransitionError::AlreadyReleased(ReleaseReason::Expired))
    );
    assert_eq!(
        book.reap(T0 + HOLD_MS, &mut Vec::new()),
        0,
        "released once only"
    );
}

#[test]
fn reap_releases_exactly_the_due_held_holds() {
    let book = book(10, 3, 4);
    let h1 = book.reserve(id(1), id(7), 1, T0).unwrap().id;
    let h2 = book.reserve(id(2), id(8), 2, T0 + 100).unwrap().id;
    book.reserve(id(3), id(9), 3, T0 + 200).unwrap();
    let mut out = Vec::new();
    assert_eq!(book.reap(T0 + HOLD_MS - 1, &mut out), 0);
    assert_eq!(book.reap(T0 + HOLD_MS + 100, &mut out), 2);
    let mut reaped: Vec<Uuid> = out.iter().map(|hold| hold.id).collect();
    reaped.sort();
    let mut due = vec![h1, h2];
    due.sort();
    assert_eq!(reaped, due);
    assert!(out
        .iter()
        .all(|hold| hold.state == HoldState::Released(ReleaseReason::Expired)));
    assert_eq!(book.counts(), counts(10, 7, 3, 0));
    assert_eq!(book.member_units(id(8)), 0);
    assert_eq!(book.member_units(id(9)), 3);
    assert_eq!(book.reap(T0 + HOLD_MS + 100, &mut out), 0);
    assert_eq!(book.reap(T0 + HOLD_MS + 200, &mut out), 1);
    assert_eq!(out.len(), 3);
    assert_eq!(book.counts(), counts(10, 10, 0, 0));
}

#[test]
fn a_paying_hold_survives_reap_and_expires_after_abort() {
    let book = book(10, 3, 2);
    let h1 = book.reserve(id(1), id(7), 2, T0).unwrap().id;
    let h2 = book.reserve(id(2), id(8), 1, T0).unwrap().id;
    book.begin_payment(h1, id(7), T0 + 10).unwrap();
    let mut out = Vec::new();
    assert_eq!(book.reap(T0 + HOLD_MS, &mut out), 1, "only the held one");
    assert_eq!(out[0].id, h2);
    assert_eq!(book.reap(T0 + HOLD_MS + 10, &mut out), 0, "still paying");
    assert_eq!(state_of(&book, h1), Some(HoldState::Paying));
    assert_eq!(book.counts(), counts(10, 8, 2, 0));

    book.abort_payment(h1).unwrap();
    assert_eq!(book.reap(T0 + HOLD_MS + 20, &mut out), 1);
    assert_eq!(out[1].id, h1);
    assert_eq!(out[1].state, HoldState::Released(ReleaseReason::Expired));
    assert_eq!(book.counts(), counts(10, 10, 0, 0));
    assert_eq!(book.member_units(id(7)), 0);
    assert!(book.shard_counts().len() == 2);
}

#[test]
fn restore_rebuilds_counts_limits_and_expiry() {
    let params = DropParams {
        stock: 10,
        per_member_limit: 3,
        hold_ms: HOLD_MS,
        shards: 4,
    };
    let (alice, bob, carol) = (id(7), id(8), id(9));
    let held = [
        RestoredHold {
            id: id(1),
            member: carol,
            quantity: 2,
            created_at_ms: T0 - 500,
            expires_at_ms: T0 + 500,
        },
        RestoredHold {
            id: id(2),
            member: bob,
            quantity: 1,
            created_at_ms: T0 - 900,
            expires_at_ms: T0 + 100,
        },
    ];
    let book = DropBook::restore(params, [(alice, 2), (bob, 1), (alice, 1)], held).unwrap();
    assert_eq!(book.counts(), counts(10, 3, 3, 4));
    assert_eq!(book.member_units(alice), 3);
    assert_eq!(book.member_units(bob), 2);
    assert_eq!(book.member_units(carol), 2);
    assert_eq!(
        book.reserve(id(3), alice, 1, T0),
        Err(ReserveRejection::LimitExceeded)
    );
    assert_eq!(
        book.reserve(id(3), bob, 2, T0),
        Err(ReserveRejection::LimitExceeded)
    );
    let h3 = book.reserve(id(3), bob, 1, T0).unwrap().id;
    assert_eq!(
        book.hold(id(1))
            .map(|hold| (hold.member, hold.expires_at_ms)),
        Some((carol, T0 + 500)),
        "a restored hold keeps its id"
    );
    assert_eq!(book.place_of(id(1)), Some((book.home_of(carol), 0)));
    assert_eq!(book.place_of(h3), Some((book.home_of(bob), 1)));

    // Restored holds expire at their own time and can be paid.
    let mut out = Vec::new();
    assert_eq!(book.reap(T0 + 100, &mut out), 1);
    assert_eq!(out[0].id, id(2));
    book.begin_payment(id(1), carol, T0 + 200).unwrap();
    book.complete_payment(id(1)).unwrap();
    assert_eq!(book.counts(), counts(10, 3, 1, 6));
    assert_eq!(book.member_units(bob), 2, "one paid, one held");
    assert_eq!(
        book.shard_counts().iter().map(|shard| shard.0).sum::<u32>(),
        10
    );
}

#[test]
fn restore_of_a_fully_committed_drop_starts_sold_out() {
    let params = DropParams {
        stock: 3,
        per_member_limit: 3,
        hold_ms: HOLD_MS,
        shards: 2,
    };
    let held = [RestoredHold {
        id: id(1),
        member: id(8),
        quantity: 1,
        created_at_ms: T0,
        expires_at_ms: T0 + HOLD_MS,
    }];
    let book = DropBook::restore(params, [(id(7), 2)], held).unwrap();
    assert!(book.is_sold_out());
    assert_eq!(book.counts(), counts(3, 0, 1, 2));
    assert_eq!(book.reap(T0 + HOLD_MS, &mut Vec::new()), 1);
    assert!(!book.is_sold_out());
    book.reserve(id(2), id(9), 1, T0 + HOLD_MS).unwrap();
}

#[test]
fn restore_refuses_inconsistent_state() {
    let params = DropParams {
        stock: 3,
        per_member_limit: 3,
        hold_ms: HOLD_MS,
        shards: 2,
    };
    let hold = |n: u128, quantity: u32| RestoredHold {
        id: id(n),
        member: id(7),
        quantity,
        created_at_ms: T0,
        expires_at_ms: T0 + HOLD_MS,
    };
    assert_eq!(
        DropBook::restore(params, [(id(8), 3)], [hold(1, 1)]).err(),
        Some(RestoreError::Oversold {
            stock: 3,
            committed: 4
        })
    );
    assert_eq!(
        DropBook::restore(params, [], [hold(1, 1), hold(1, 1)]).err(),
        Some(RestoreError::DuplicateHold(id(1)))
    );
    assert_eq!(
        DropBook::restore(params, [], [hold(1, 0)]).err(),
        Some(RestoreError::ZeroQuantity(id(1)))
    );
}

#[test]
fn shard_counts_are_normalized_to_a_power_of_two() {
    for (asked, used) in [(0, 1), (1, 1), (3, 4), (8, 8), (100_000, MAX_SHARDS)] {
        let book = book(1_000, 1, asked);
        assert_eq!(book.params().shards, used);
        assert_eq!(book.shard_counts().len(), used);
        assert_eq!(book.counts(), counts(1_000, 1_000, 0, 0));
    }
    // 10 units over 4 shards: the first two get one more.
    assert_eq!(
        book(10, 1, 4).shard_counts(),
        vec![(3, 3, 0, 0), (3, 3, 0, 0), (2, 2, 0, 0), (2, 2, 0, 0)]
    );
}

#[test]
fn reserve_then_many_transitions_across_shards_conserves_stock() {
    let book = book(40, 4, 8);
    let mut now = T0;
    // The ids of the reservations made so far; a refused one leaves an id that names no hold.
    let mut holds: Vec<Uuid> = Vec::new();
    let mut moved = 0;
    for round in 0..200usize {
        let member = id(round as u128 % 13 + 100);
        now += 37;
        let quantity = (round % 4) as u32 + 1;
        let hold = book
            .reserve(id(round as u128 + 1), member, quantity, now)
            .map_or(id(u128::MAX), |hold| hold.id);
        holds.push(hold);
        let earlier = |back: usize| holds[round.saturating_sub(back)];
        moved += match round % 5 {
            0 => usize::from(
                book.cancel(earlier(1), id((round as u128 + 12) % 13 + 100))
                    .is_ok(),
            ),
            1 => usize::from(book.begin_payment(hold, member, now).is_ok()),
            2 => usize::from(book.complete_payment(earlier(1)).is_ok()),
            3 => book.reap(now, &mut Vec::new()),
            _ => usize::from(book.decline_payment(earlier(3)).is_ok()),
        };
        let snapshot = book.counts();
        assert_eq!(snapshot.available + snapshot.held + snapshot.paid, 40);
        for member in 100..113 {
            assert!(book.member_units(id(member)) <= 4);
        }
    }
    assert!(moved > 40, "only {moved} transitions went through");
}

#[test]
fn a_hold_id_keeps_the_seed_and_names_the_holds_place() {
    for shards in [1, 2, 4, 8, MAX_SHARDS] {
        let book = book(10_000, 2, shards);
        let shard_bits = shards.trailing_zeros();
        let mut next_slot = vec![0u32; shards];
        for n in 0..300u128 {
            let member = id(n * 0x9E37_79B9_7F4A_7C15 + 7);
            let seed = Uuid::now_v7();
            let hold = book.reserve(seed, member, 1, T0).unwrap();
            let home = book.home_of(member);
            let bytes = hold.id.as_bytes();
            assert_eq!(
                bytes[..12],
                seed.as_bytes()[..12],
                "timestamp, version, variant, counter"
            );
            assert_eq!(hold.id.get_version_num(), 7);
            assert_eq!(hold.id.get_variant(), seed.get_variant());
            let packed = u32::from_be_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
            assert_eq!(packed >> shard_bits, next_slot[home], "the slot");
            assert_eq!(packed as usize & (shards - 1), home, "the shard");
            assert_eq!(
                book.place_of(hold.id),
                Some((home, next_slot[home] as usize))
            );
            next_slot[home] += 1;
        }
    }
}

#[test]
fn an_id_that_names_a_place_but_not_its_hold_is_not_found() {
    let book = book(10, 2, 2);
    let member = id(7);
    let hold = book.reserve(id(1), member, 1, T0).unwrap();
    // Same place, other bits: a forged or mistyped id.
    let mut bytes = *hold.id.as_bytes();
    bytes[3] ^= 0x40;
    let forged = Uuid::from_bytes(bytes);
    // A place past the end of the list.
    bytes = *hold.id.as_bytes();
    bytes[13] = 9;
    let beyond = Uuid::from_bytes(bytes);
    for other in [forged, beyond] {
        assert_eq!(book.hold(other), None);
        assert_eq!(
            book.begin_payment(other, member, T0),
            Err(TransitionError::NotFound)
        );
        assert_eq!(book.complete_payment(other), Err(TransitionError::NotFound));
        assert_eq!(book.abort_payment(other), Err(TransitionError::NotFound));
        assert_eq!(book.decline_payment(other), Err(TransitionError::NotFound));
        assert_eq!(book.cancel(other, member), Err(TransitionError::NotFound));
    }
    assert_eq!(book.hold(hold.id), Some(hold));
    assert_eq!(book.counts(), counts(10, 9, 1, 0));
}

#[test]
fn new_ids_never_equal_restored_ones() {
    let params = DropParams {
        stock: 10,
        per_member_limit: 3,
        hold_ms: HOLD_MS,
        shards: 1,
    };
    let seed = Uuid::now_v7();
    // The id the next hold (slot 1, after the restored hold at slot 0, in the only shard) would get from `seed`.
    let mut bytes = *seed.as_bytes();
    bytes[12..].copy_from_slice(&1u32.to_be_bytes());
    let taken = Uuid::from_bytes(bytes);
    let restored = RestoredHold {
        id: taken,
        member: id(8),
        quantity: 1,
        created_at_ms: T0,
        expires_at_ms: T0 + HOLD_MS,
    };
    let book = DropBook::restore(params, [], [restored]).unwrap();
    let hold = book.reserve(seed, id(7), 2, T0 + 10).unwrap();
    assert_ne!(hold.id, taken);
    assert_eq!(
        hold.id.as_bytes()[12..],
        taken.as_bytes()[12..],
        "same place"
    );
    assert_eq!(book.hold(taken).map(|hold| hold.member), Some(id(8)));
    assert_eq!(book.hold(hold.id), Some(hold));
    book.cancel(taken, id(8)).unwrap();
    assert_eq!(
        book.hold(hold.id).map(|hold| hold.state),
        Some(HoldState::Held)
    );
    assert_eq!(book.counts(), counts(10, 8, 2, 0));
}

#[test]
fn holds_on_every_shard_go_through_every_transition() {
    for home in 0..4 {
        let book = book(40, 3, 4);
        let member = member_at(&book, home, 0);
        let other = member_at(&book, (home + 1) % 4, 0);
        let reserve = |member: Uuid, quantity: u32, now: i64| {
            book.reserve(Uuid::now_v7(), member, quantity, now)
                .unwrap()
                .id
        };
        let (paid, cancelled, declined) = (
            reserve(member, 1, T0),
            reserve(member, 1, T0),
            reserve(member, 1, T0),
        );
        assert_eq!(
            book.reserve(Uuid::now_v7(), member, 1, T0),
            Err(ReserveRejection::LimitExceeded)
        );
        for (slot, hold) in [paid, cancelled, declined].into_iter().enumerate() {
            assert_eq!(book.place_of(hold), Some((home, slot)));
        }
        assert_eq!(book.member_units(member), 3);
        assert_eq!(book.member_units(other), 0);
        assert_eq!(book.shard_counts()[home], (10, 7, 3, 0));

        book.begin_payment(paid, member, T0).unwrap();
        book.complete_payment(paid).unwrap();
        assert_eq!(book.shard_counts()[home], (10, 7, 2, 1));
        book.cancel(cancelled, member).unwrap();
        assert_eq!(book.member_units(member), 2);
        book.begin_payment(declined, member, T0).unwrap();
        book.decline_payment(declined).unwrap();
        assert_eq!(book.member_units(member), 1);
        assert_eq!(book.shard_counts()[home], (10, 9, 0, 1));
        assert_eq!(
            book.cancel(cancelled, member),
            Err(TransitionError::AlreadyReleased(ReleaseReason::Cancelled))
        );

        let expired = reserve(member, 2, T0 + 10);
        let others = reserve(other, 3, T0 + 20);
        let mut out = Vec::new();
        assert_eq!(book.reap(T0 + 10 + HOLD_MS, &mut out), 1);
        assert_eq!(out[0].id, expired);
        assert_eq!(out[0].state, HoldState::Released(ReleaseReason::Expired));
        assert_eq!(book.member_units(member), 1, "only the paid unit is left");
        assert_eq!(book.reap(T0 + 20 + HOLD_MS, &mut out), 1);
        assert_eq!(out[1].id, others);
        assert_eq!(book.member_units(other), 0);
        assert_eq!(book.counts(), counts(40, 39, 0, 1));
        assert_eq!(book.shard_counts()[home], (10, 9, 0, 1));
        assert_eq!(state_of(&book, paid), Some(HoldState::Paid));
    }
}

#[test]
fn holds_of_different_drops_never_share_an_id() {
    // Two drops opening together: the same places fill in the same milliseconds, from seeds made one after another
    // as the service makes them. The ids differ because each keeps its seed's millisecond and counter.
    let (first, second) = (book(4_000, 1, 16), book(4_000, 1, 16));
    let mut ids = std::collections::HashSet::new();
    for n in 0..4_000u128 {
        let member = id(n << 64 | n);
        for book in [&first, &second] {
            let hold = book.reserve(Uuid::now_v7(), member, 1, T0).unwrap();
            assert!(ids.insert(hold.id), "{} made twice", hold.id);
        }
    }
    assert_eq!(ids.len(), 8_000);
}

#[test]
fn hold_lists_grow_past_a_chunk_and_every_hold_stays_reachable() {
    // One shard, so every hold lands in one list: 2500 holds cross two chunk boundaries (1024 each).
    let book = book(2_500, 1, 1);
    let holds: Vec<HoldView> = (0..2_500u128)
        .map(|n| {
            book.reserve(id(n), id(n << 64 | 1), 1, T0 + n as i64)
                .unwrap()
        })
        .collect();
    for (slot, hold) in holds.iter().enumerate() {
        assert_eq!(book.place_of(hold.id), Some((0, slot)));
        assert_eq!(book.hold(hold.id), Some(*hold));
    }
    assert_eq!(book.counts(), counts(2_500, 0, 2_500, 0));
    // Pay one on each side of a boundary, then expire the rest in two steps that stop inside the second chunk.
    for hold in [&holds[1023], &holds[1024]] {
        book.begin_payment(hold.id, hold.member, T0 + 1).unwrap();
        book.complete_payment(hold.id).unwrap();
    }
    let mut out = Vec::new();
    assert_eq!(book.reap(T0 + HOLD_MS + 1500, &mut out), 1499);
    assert_eq!(book.reap(T0 + HOLD_MS + 2499, &mut out), 999);
    assert_eq!(book.counts(), counts(2_500, 2_498, 0, 2));
}
