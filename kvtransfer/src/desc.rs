/// Where a descriptor's memory lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MemKind {
    /// Host memory (DRAM).
    Dram = 0,
    /// GPU memory; `dev` of the descriptor is the device ordinal.
    Vram = 1,
}

impl MemKind {
    pub(crate) fn from_u8(v: u8) -> Option<MemKind> {
        match v {
            0 => Some(MemKind::Dram),
            1 => Some(MemKind::Vram),
            _ => None,
        }
    }
}

/// One contiguous piece of registered memory: address, length and device (0 for DRAM).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct Desc {
    pub addr: u64,
    pub len: u64,
    pub dev: u32,
}

/// A list of descriptors of one memory kind. Building one is a plain vector push; they are
/// checked against registered regions when a transfer is prepared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescList {
    kind: MemKind,
    descs: Vec<Desc>,
}

impl DescList {
    pub fn new(kind: MemKind) -> Self {
        DescList {
            kind,
            descs: Vec::new(),
        }
    }

    pub fn with_capacity(kind: MemKind, n: usize) -> Self {
        DescList {
            kind,
            descs: Vec::with_capacity(n),
        }
    }

    /// Appends a descriptor.
    #[inline]
    pub fn push(&mut self, addr: u64, len: u64, dev: u32) {
        self.descs.push(Desc { addr, len, dev });
    }

    pub fn kind(&self) -> MemKind {
        self.kind
    }

    pub fn len(&self) -> usize {
        self.descs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.descs.is_empty()
    }

    pub fn clear(&mut self) {
        self.descs.clear();
    }

    pub fn as_slice(&self) -> &[Desc] {
        &self.descs
    }

    /// Total bytes the list covers.
    pub fn total_bytes(&self) -> u64 {
        self.descs.iter().map(|d| d.len).sum()
    }
}

impl Extend<Desc> for DescList {
    fn extend<T: IntoIterator<Item = Desc>>(&mut self, iter: T) {
        self.descs.extend(iter)
    }
}
