//! Snapshots of what every task is doing, for deadlock and watchdog reports.
//!
//! A [`Report`] is plain data (strings), taken at one moment, so it can be printed,
//! compared and searched by tests after the executor has moved on or been dropped.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::task::TaskId;

/// One task in a [`Report`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskReport {
    /// The task's id.
    pub id: TaskId,
    /// Its name; for a worker running an item, `item on worker:name`.
    pub name: String,
    /// Whether it was runnable when the report was taken.
    pub ready: bool,
    /// What its last `Pending` poll said it waits on (outermost first).
    pub waiting_on: Vec<String>,
    /// Locks it holds.
    pub holds: Vec<String>,
}

/// What every live task was doing at one moment, plus notes from other parts of the
/// runtime (the queues of workers).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Live tasks in id (spawn) order.
    pub tasks: Vec<TaskReport>,
    /// Other state, one line each, such as `worker primary: running probe:nic1; queued: ...`.
    pub notes: Vec<String>,
}

impl Report {
    /// The tasks that were not runnable.
    pub fn blocked(&self) -> impl Iterator<Item = &TaskReport> {
        self.tasks.iter().filter(|task| !task.ready)
    }
}

impl fmt::Display for TaskReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "task {} {}", self.id, self.name)?;
        if self.ready {
            f.write_str(" is ready")?;
        } else if self.waiting_on.is_empty() {
            f.write_str(" waits on something that did not say what")?;
        } else {
            f.write_str(" waits on ")?;
            for (i, reason) in self.waiting_on.iter().enumerate() {
                if i > 0 {
                    f.write_str("; ")?;
                }
                f.write_str(reason)?;
            }
        }
        for lock in &self.holds {
            write!(f, "; holds {lock}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tasks.is_empty() {
            f.write_str("  (no live tasks)\n")?;
        }
        for task in &self.tasks {
            writeln!(f, "  {task}")?;
        }
        for note in &self.notes {
            writeln!(f, "  {note}")?;
        }
        Ok(())
    }
}
