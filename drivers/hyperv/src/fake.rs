//! Test doubles: a virtual processor that records every MSR access and hypercall, and
//! shared pages backed by plain bytes. Host tests only.

extern crate std;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::vec;
use std::vec::Vec;

use crate::hw::{HvCpu, HvPage, PAGE_SIZE};
use crate::msr::*;

/// One recorded operation, in program order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Rdmsr(u32),
    Wrmsr(u32, u64),
    /// A slow hypercall, with the first 256 bytes of the input page as they were at the
    /// moment of the call.
    Hypercall {
        control: u64,
        input_gpa: u64,
        output_gpa: u64,
        input: Vec<u8>,
    },
    FastHypercall {
        control: u64,
        rdx: u64,
        r8: u64,
    },
    /// An atomic swap on a shared page (the guest freeing a slot or taking flags).
    Swap {
        page: &'static str,
        offset: usize,
        old: u64,
        new: u64,
    },
}

pub type Log = Rc<RefCell<Vec<Op>>>;

/// A virtual processor that behaves like the TLFS says for the MSRs this crate uses.
pub struct FakeCpu {
    pub log: Log,
    pub msrs: RefCell<BTreeMap<u32, u64>>,
    /// RAX returned by every hypercall.
    pub result: Cell<u64>,
    /// The page a slow hypercall's input GPA points at (snapshotted into the log).
    pub input_page: RefCell<Option<Rc<FakePage>>>,
}

impl FakeCpu {
    pub fn new() -> Self {
        let mut msrs = BTreeMap::new();
        for n in 0..16 {
            // SINT reset value: masked, vector 0 (hvgdk_mini.h).
            msrs.insert(HV_X64_MSR_SINT0 + n, SintMsr::MASKED);
        }
        msrs.insert(HV_X64_MSR_SVERSION, 1);
        msrs.insert(HV_X64_MSR_VP_INDEX, 0);
        FakeCpu {
            log: Rc::new(RefCell::new(Vec::new())),
            msrs: RefCell::new(msrs),
            result: Cell::new(0),
            input_page: RefCell::new(None),
        }
    }

    pub fn set(&self, msr: u32, value: u64) {
        self.msrs.borrow_mut().insert(msr, value);
    }

    pub fn get(&self, msr: u32) -> u64 {
        self.msrs.borrow().get(&msr).copied().unwrap_or(0)
    }

    pub fn ops(&self) -> Vec<Op> {
        self.log.borrow().clone()
    }

    /// Only the MSR writes, in order.
    pub fn writes(&self) -> Vec<(u32, u64)> {
        self.log
            .borrow()
            .iter()
            .filter_map(|op| match op {
                Op::Wrmsr(m, v) => Some((*m, *v)),
                _ => None,
            })
            .collect()
    }

    pub fn clear_log(&self) {
        self.log.borrow_mut().clear();
    }
}

impl HvCpu for FakeCpu {
    fn rdmsr(&self, msr: u32) -> u64 {
        self.log.borrow_mut().push(Op::Rdmsr(msr));
        self.get(msr)
    }

    fn wrmsr(&self, msr: u32, value: u64) {
        self.log.borrow_mut().push(Op::Wrmsr(msr, value));
        let mut stored = value;
        if msr == HV_X64_MSR_HYPERCALL {
            let current = self.get(msr);
            if current & HYPERCALL_LOCKED != 0 && PageMsr(current).enabled() {
                // TLFS: a locked hypercall MSR cannot be changed until reset.
                return;
            }
            if self.get(HV_X64_MSR_GUEST_OS_ID) == 0 {
                // TLFS: without a guest OS id the enable bit stays zero.
                stored &= !PageMsr::ENABLE;
            }
        }
        if matches!(msr, HV_X64_MSR_VP_INDEX | HV_X64_MSR_SVERSION) {
            return; // read-only
        }
        self.set(msr, stored);
    }

    fn hypercall(&self, control: u64, input_gpa: u64, output_gpa: u64) -> u64 {
        let input = match self.input_page.borrow().as_ref() {
            Some(p) => p.bytes.borrow()[..256].to_vec(),
            None => Vec::new(),
        };
        self.log.borrow_mut().push(Op::Hypercall {
            control,
            input_gpa,
            output_gpa,
            input,
        });
        self.result.get()
    }

    fn fast_hypercall(&self, control: u64, rdx: u64, r8: u64) -> u64 {
        self.log
            .borrow_mut()
            .push(Op::FastHypercall { control, rdx, r8 });
        self.result.get()
    }
}

/// A shared page backed by bytes; the "host side" writes it directly with `put_*`.
pub struct FakePage {
    pub name: &'static str,
    pub bytes: RefCell<Vec<u8>>,
    pub log: Log,
}

impl FakePage {
    pub fn new(name: &'static str, log: &Log) -> Self {
        FakePage {
            name,
            bytes: RefCell::new(vec![0; PAGE_SIZE]),
            log: log.clone(),
        }
    }

    pub fn put(&self, offset: usize, data: &[u8]) {
        self.bytes.borrow_mut()[offset..offset + data.len()].copy_from_slice(data);
    }

    pub fn put_u32(&self, offset: usize, v: u32) {
        self.put(offset, &v.to_le_bytes());
    }

    pub fn put_u64(&self, offset: usize, v: u64) {
        self.put(offset, &v.to_le_bytes());
    }

    pub fn get_u32(&self, offset: usize) -> u32 {
        let b = self.bytes.borrow();
        u32::from_le_bytes(b[offset..offset + 4].try_into().unwrap())
    }

    pub fn get_u64(&self, offset: usize) -> u64 {
        let b = self.bytes.borrow();
        u64::from_le_bytes(b[offset..offset + 8].try_into().unwrap())
    }

    fn check(offset: usize, len: usize, align: usize) {
        assert!(
            offset + len <= PAGE_SIZE,
            "access {offset}+{len} beyond the page"
        );
        assert_eq!(
            offset % align,
            0,
            "misaligned {len}-byte access at {offset}"
        );
    }
}

impl HvPage for FakePage {
    fn read(&self, offset: usize, buf: &mut [u8]) {
        Self::check(offset, buf.len(), 1);
        buf.copy_from_slice(&self.bytes.borrow()[offset..offset + buf.len()]);
    }

    fn write(&self, offset: usize, data: &[u8]) {
        Self::check(offset, data.len(), 1);
        self.put(offset, data);
    }

    fn load_u32(&self, offset: usize) -> u32 {
        Self::check(offset, 4, 4);
        self.get_u32(offset)
    }

    fn load_u64(&self, offset: usize) -> u64 {
        Self::check(offset, 8, 8);
        self.get_u64(offset)
    }

    fn swap_u32(&self, offset: usize, value: u32) -> u32 {
        Self::check(offset, 4, 4);
        let old = self.get_u32(offset);
        self.put_u32(offset, value);
        self.log.borrow_mut().push(Op::Swap {
            page: self.name,
            offset,
            old: old.into(),
            new: value.into(),
        });
        old
    }

    fn swap_u64(&self, offset: usize, value: u64) -> u64 {
        Self::check(offset, 8, 8);
        let old = self.get_u64(offset);
        self.put_u64(offset, value);
        self.log.borrow_mut().push(Op::Swap {
            page: self.name,
            offset,
            old,
            new: value,
        });
        old
    }
}
