//! Reservation ids of the Redis gate. A hold is record `index` of the reserve entry `<ms>-<seq>` in its drop's
//! stream, and its id says so, together with the drop: any instance finds any hold from its id alone, with no map
//! and no Postgres read, and the id is unique by construction (one stream entry per drop and id).
//!
//! Layout, a valid UUIDv7 whose timestamp is the hold's creation by Redis's clock:
//! - bits 0..48: the entry's milliseconds; then the version (7);
//! - 12 bits (`rand_a`): the index in the entry, so at most `INDEX_MAX + 1` holds per entry;
//! - after the variant, 62 bits: the entry's sequence (30 bits) and the drop's `seq` (32 bits).

use uuid::Uuid;

/// Largest index of a hold in one reserve entry the layout can carry (a reserve call writes at most
/// `lanes::RECORDS_PER_ENTRY` records to an entry).
pub const INDEX_MAX: u32 = (1 << 12) - 1;
const SEQ_MAX: u64 = (1 << 30) - 1;
const MS_MAX: u64 = (1 << 48) - 1;

/// Where a hold lives: its drop (by `seq`), its stream entry and its index in the entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HoldRef {
    pub drop_seq: u32,
    pub ms: u64,
    pub seq: u64,
    pub index: u32,
}

impl HoldRef {
    /// The stream entry id, `<ms>-<seq>`.
    pub fn entry(&self) -> String {
        format!("{}-{}", self.ms, self.seq)
    }

    /// The hold's key in the drop's state hash, `<ms>-<seq>:<index>`, as the scripts write it.
    pub fn state_ref(&self) -> String {
        format!("{}-{}:{}", self.ms, self.seq, self.index)
    }

    /// Parses an entry id and an index. `None` for ids the layout cannot carry (never seen in practice: more
    /// than 2^30 entries in one millisecond).
    pub fn from_entry(drop_seq: u32, entry: &str, index: u32) -> Option<Self> {
        let (ms, seq) = entry.split_once('-')?;
        let hold = Self {
            drop_seq,
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
            index,
        };
        (hold.ms <= MS_MAX && hold.seq <= SEQ_MAX && index <= INDEX_MAX).then_some(hold)
    }

    /// Parses a ref as the scripts write it, `<ms>-<seq>:<index>`.
    pub fn from_ref(drop_seq: u32, text: &str) -> Option<Self> {
        let (entry, index) = text.split_once(':')?;
        Self::from_entry(drop_seq, entry, index.parse().ok()?)
    }

    pub fn id(&self) -> Uuid {
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&self.ms.to_be_bytes()[2..]);
        // The index is at most 12 bits, so the casts keep every bit.
        bytes[6] = 0x70 | ((self.index >> 8) as u8 & 0x0f);
        bytes[7] = (self.index & 0xff) as u8;
        let low = (0b10u64 << 62) | (self.seq << 32) | u64::from(self.drop_seq);
        bytes[8..].copy_from_slice(&low.to_be_bytes());
        Uuid::from_bytes(bytes)
    }

    /// The place an id names, if it has this layout. Any UUIDv7 parses; the gate then finds no hold for ids it did
    /// not make.
    pub fn from_id(id: Uuid) -> Option<Self> {
        let bytes = id.as_bytes();
        if bytes[6] >> 4 != 7 || bytes[8] >> 6 != 0b10 {
            return None;
        }
        let mut ms = [0u8; 8];
        ms[2..].copy_from_slice(&bytes[..6]);
        let mut low = [0u8; 8];
        low.copy_from_slice(&bytes[8..]);
        let low = u64::from_be_bytes(low);
        Some(Self {
            ms: u64::from_be_bytes(ms),
            index: (u32::from(bytes[6] & 0x0f) << 8) | u32::from(bytes[7]),
            seq: (low >> 32) & SEQ_MAX,
            // The low 32 bits are the drop's seq.
            drop_seq: (low & 0xffff_ffff) as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_are_v7() {
        let hold =
            HoldRef::from_entry(4_000_000_000, "1764111222333-1073741823", INDEX_MAX).unwrap();
        let id = hold.id();
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        assert_eq!(HoldRef::from_id(id), Some(hold));
        assert_eq!(hold.entry(), "1764111222333-1073741823");
        let (secs, _) = id.get_timestamp().unwrap().to_unix();
        assert_eq!(secs, 1_764_111_222);
        assert_eq!(
            HoldRef::from_ref(9, "17-3:5"),
            HoldRef::from_entry(9, "17-3", 5)
        );
    }

    #[test]
    fn distinct_places_give_distinct_ids() {
        let base = HoldRef::from_entry(1, "1000-0", 0).unwrap();
        let others = [
            HoldRef {
                drop_seq: 2,
                ..base
            },
            HoldRef { ms: 1001, ..base },
            HoldRef { seq: 1, ..base },
            HoldRef { index: 1, ..base },
        ];
        for other in others {
            assert_ne!(other.id(), base.id());
            assert_eq!(HoldRef::from_id(other.id()), Some(other));
        }
    }

    #[test]
    fn out_of_layout_places_and_foreign_ids_are_refused() {
        assert_eq!(HoldRef::from_entry(1, "1-1073741824", 0), None);
        assert_eq!(HoldRef::from_entry(1, "1-0", INDEX_MAX + 1), None);
        assert_eq!(HoldRef::from_entry(1, "garbage", 0), None);
        assert_eq!(HoldRef::from_id(Uuid::new_v4()), None);
    }
}
