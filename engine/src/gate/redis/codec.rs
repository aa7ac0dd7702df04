//! The scripts as the gate loads them, the key names of a drop, and the codecs between Rust values and what the
//! scripts take and answer (reservation records, member ids, hold states and release reasons).

use redis::{Script, Value};
use uuid::Uuid;

use crate::core::{HoldState, ReleaseReason};
use crate::gate::{GateResult, GateUnavailable};
use crate::types::DropSpec;

pub(super) const PRELUDE: &str = include_str!("prelude.lua");

/// The scripts, loaded once per server and called by hash (EVALSHA, falling back to EVAL on NOSCRIPT).
pub(super) struct Scripts {
    pub(super) reserve: Script,
    pub(super) transition: Script,
    pub(super) reap: Script,
    pub(super) init: Script,
}

/// The reserve script as the gate runs it, for tools and benchmarks that call it directly (one request per call is
/// the baseline the batched gate is measured against).
pub fn reserve_script() -> Script {
    Script::new(&format!("{PRELUDE}\n{}", include_str!("reserve.lua")))
}

impl Scripts {
    pub(super) fn new() -> Self {
        let script = |body: &str| Script::new(&format!("{PRELUDE}\n{body}"));
        Self {
            reserve: script(include_str!("reserve.lua")),
            transition: script(include_str!("transition.lua")),
            reap: script(include_str!("reap.lua")),
            init: script(include_str!("init.lua")),
        }
    }
}

pub(super) fn unavailable(err: impl std::fmt::Display) -> GateUnavailable {
    GateUnavailable(err.to_string())
}

/// The keys of one drop, in the order the scripts take them (see `prelude.lua`).
pub type DropKeys = [String; 5];
/// Index in `DropKeys` of the counters hash.
pub(super) const COUNTERS: usize = 0;
/// Index in `DropKeys` of the hold states hash.
pub(super) const STATES: usize = 2;
/// Index in `DropKeys` of the stream.
pub(super) const STREAM: usize = 3;

/// The key names of one drop under `prefix`, all with the hash tag `{drop:<id>}`: counters, members, states,
/// stream, payments in progress.
pub fn drop_keys(prefix: &str, drop: Uuid) -> DropKeys {
    let base = format!("{prefix}{{drop:{drop}}}");
    [
        format!("{base}:c"),
        format!("{base}:m"),
        format!("{base}:s"),
        format!("{base}:e"),
        format!("{base}:p"),
    ]
}

pub(super) fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        Value::SimpleString(text) => text.parse().ok(),
        _ => None,
    }
}

pub(super) fn text(value: &Value) -> Option<&str> {
    match value {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        Value::SimpleString(text) => Some(text),
        _ => None,
    }
}

pub(super) fn array(value: Value) -> Option<Vec<Value>> {
    match value {
        Value::Array(items) => Some(items),
        _ => None,
    }
}

pub(super) fn malformed(what: &str) -> GateUnavailable {
    GateUnavailable(format!("malformed reply from Redis ({what})"))
}

/// Bytes of one hold record in a reserve entry: the member's 32 hex digits and the quantity's 4 digits.
pub(super) const RECORD_BYTES: usize = 36;

/// Writes a hold record into `out` and returns it.
pub(super) fn write_record(
    out: &mut [u8; RECORD_BYTES],
    member: Uuid,
    quantity: u32,
) -> &[u8; RECORD_BYTES] {
    member.simple().encode_lower(&mut out[..32]);
    // Quantities are at most 9999 (the gate refuses larger ones before a script sees them).
    let mut q = quantity.min(9999);
    for digit in out[32..].iter_mut().rev() {
        *digit = b'0' + (q % 10) as u8;
        q /= 10;
    }
    out
}

pub(super) fn member_hex(member: Uuid) -> String {
    member.simple().to_string()
}

pub(super) fn parse_member(hex: &str) -> Option<Uuid> {
    Uuid::try_parse(hex).ok()
}

pub(super) fn state_of(text: &str) -> HoldState {
    match text.as_bytes().first() {
        Some(b'p') => HoldState::Paying,
        Some(b'P') => HoldState::Paid,
        Some(b'x') => HoldState::Released(reason_of(text.get(2..).unwrap_or(""))),
        _ => HoldState::Held,
    }
}

pub(super) fn reason_of(code: &str) -> ReleaseReason {
    match code {
        "c" => ReleaseReason::Cancelled,
        "d" => ReleaseReason::PaymentDeclined,
        _ => ReleaseReason::Expired,
    }
}

/// A drop's `seq`, which hold ids carry in 32 bits.
pub(super) fn drop_seq(drop: &DropSpec) -> GateResult<u32> {
    u32::try_from(drop.seq)
        .map_err(|_| GateUnavailable(format!("drop seq {} does not fit a hold id", drop.seq)))
}
