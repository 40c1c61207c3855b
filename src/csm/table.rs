//! The connection table: a slab of entries addressed by typed [`ConnId`]s, with an index by
//! connection addresses. A slot that is reused gets a new generation, so an id (an epoll token,
//! a queued RX turn, an armed timer) that outlived its connection finds nothing.

use std::collections::HashMap;

use super::connection::Addr;

/// Generations are 31 bits wide, so an id fits an epoll token beside a tag bit.
const GEN_MASK: u32 = 0x7fff_ffff;

/// A connection's place in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    /// Slot index.
    pub slot: u32,
    /// Generation of the slot (31 bits).
    pub gen: u32,
}

impl ConnId {
    /// An id from its two halves, the generation masked to 31 bits.
    pub fn new(slot: u32, gen: u32) -> ConnId {
        ConnId {
            slot,
            gen: gen & GEN_MASK,
        }
    }
}

/// The addresses that name a connection in the table: the CID and port the guest talks to,
/// and the guest's port (the guest's CID is the device's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    /// The CID the guest talks to.
    pub cid: u64,
    /// The port on that side.
    pub port: u32,
    /// The guest's port.
    pub guest_port: u32,
}

impl Key {
    /// The key of a connection with these addresses.
    pub fn of(a: &Addr) -> Key {
        Key {
            cid: a.local_cid,
            port: a.local_port,
            guest_port: a.peer_port,
        }
    }
}

struct Slot<E> {
    gen: u32,
    entry: Option<(Key, E)>,
}

/// Entries `E` by id and by key.
pub struct Table<E> {
    slots: Vec<Slot<E>>,
    free: Vec<u32>,
    index: HashMap<Key, u32>,
}

impl<E> Default for Table<E> {
    fn default() -> Self {
        Table {
            slots: Vec::new(),
            free: Vec::new(),
            index: HashMap::new(),
        }
    }
}

impl<E> Table<E> {
    /// Live entries.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The entry with `key`.
    pub fn find(&self, key: &Key) -> Option<ConnId> {
        let slot = *self.index.get(key)?;
        Some(ConnId::new(slot, self.slots[slot as usize].gen))
    }

    /// Inserts `e` under `key`, which must be free; returns its id.
    pub fn insert(&mut self, key: Key, e: E) -> ConnId {
        debug_assert!(!self.index.contains_key(&key), "key in use");
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot {
                    gen: 0,
                    entry: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let s = &mut self.slots[slot as usize];
        s.entry = Some((key, e));
        self.index.insert(key, slot);
        ConnId::new(slot, s.gen)
    }

    fn slot(&self, id: ConnId) -> Option<&Slot<E>> {
        self.slots.get(id.slot as usize).filter(|s| s.gen == id.gen)
    }

    /// The entry `id`, unless it is gone.
    pub fn get(&self, id: ConnId) -> Option<&E> {
        self.slot(id)?.entry.as_ref().map(|(_, e)| e)
    }

    /// The entry `id`, unless it is gone.
    pub fn get_mut(&mut self, id: ConnId) -> Option<&mut E> {
        let s = self.slots.get_mut(id.slot as usize)?;
        if s.gen != id.gen {
            return None;
        }
        s.entry.as_mut().map(|(_, e)| e)
    }

    /// Removes the entry `id`; its slot gets a new generation.
    pub fn remove(&mut self, id: ConnId) -> Option<E> {
        let s = self.slots.get_mut(id.slot as usize)?;
        if s.gen != id.gen {
            return None;
        }
        let (key, e) = s.entry.take()?;
        s.gen = s.gen.wrapping_add(1) & GEN_MASK;
        self.index.remove(&key);
        self.free.push(id.slot);
        Some(e)
    }

    /// Every live entry with its id.
    pub fn iter(&self) -> impl Iterator<Item = (ConnId, &E)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            s.entry
                .as_ref()
                .map(|(_, e)| (ConnId::new(i as u32, s.gen), e))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: u32) -> Key {
        Key {
            cid: 2,
            port: p,
            guest_port: 1,
        }
    }

    #[test]
    fn a_reused_slot_does_not_answer_to_an_old_id() {
        let mut t = Table::default();
        let a = t.insert(key(1), "a");
        assert_eq!(t.find(&key(1)), Some(a));
        assert_eq!(t.remove(a), Some("a"));
        assert_eq!(t.find(&key(1)), None);
        let b = t.insert(key(2), "b");
        assert_eq!(b.slot, a.slot, "the slot is reused");
        assert_ne!(b.gen, a.gen);
        assert_eq!(t.get(a), None, "the old id finds nothing");
        assert_eq!(t.remove(a), None);
        assert_eq!(t.get(b), Some(&"b"));
        assert_eq!(t.len(), 1);
        assert_eq!(
            t.iter().map(|(id, e)| (id, *e)).collect::<Vec<_>>(),
            [(b, "b")]
        );
    }

    #[test]
    fn generations_wrap_within_31_bits() {
        let id = ConnId::new(3, u32::MAX);
        assert_eq!(id.gen, 0x7fff_ffff);
        let mut t: Table<()> = Table::default();
        t.slots.push(Slot {
            gen: GEN_MASK,
            entry: None,
        });
        t.free.push(0);
        let a = t.insert(key(1), ());
        assert_eq!(a.gen, GEN_MASK);
        t.remove(a);
        assert_eq!(t.slots[0].gen, 0);
    }
}
