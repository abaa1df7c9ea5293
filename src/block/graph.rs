//! `BlockGraph`: the registry of nodes by node-name.
//!
//! The graph refuses duplicate and malformed names and refuses to delete a
//! node that a parent node or an export still uses. Nodes created inline
//! (`file.driver=file,...`) get generated names (`#blockN`, as in QEMU) and
//! are removed together with the parent that created them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::node::BlockNode;

/// Why a graph change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    /// The name is already taken.
    #[error("Duplicate nodes with node-name='{0}'")]
    Duplicate(String),
    /// The name does not follow QEMU's rules.
    #[error("Invalid node-name: '{0}' (it must start with a letter and contain only letters, digits, '-', '.' and '_', at most 31 characters)")]
    InvalidName(String),
    /// No node has this name.
    #[error("Failed to find node with node-name='{0}'")]
    NotFound(String),
    /// The node is used by someone.
    #[error("Node '{0}' is busy: in use by {1}")]
    InUse(String, String),
    /// Only user-created nodes can be deleted.
    #[error("Node '{0}' is not a root node created by blockdev-add")]
    NotRoot(String),
}

/// The node-name registry.
#[derive(Default)]
pub struct BlockGraph {
    nodes: Mutex<BTreeMap<String, Arc<BlockNode>>>,
    next_implicit: AtomicU64,
}

/// Checks a user-given node-name against QEMU's rules.
pub fn check_node_name(name: &str) -> Result<(), GraphError> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if first_ok && rest_ok && name.len() <= 31 {
        Ok(())
    } else {
        Err(GraphError::InvalidName(name.to_string()))
    }
}

impl BlockGraph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<BlockNode>>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh name for an inline node.
    pub fn implicit_name(&self) -> String {
        format!("#block{}", self.next_implicit.fetch_add(1, Ordering::Relaxed))
    }

    /// Whether `name` is taken.
    pub fn contains(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// Adds a node (and registers its implicit children; every child records
    /// its parent as a user). Refuses duplicates.
    pub fn insert(&self, node: Arc<BlockNode>) -> Result<(), GraphError> {
        let mut nodes = self.lock();
        if nodes.contains_key(node.name()) {
            return Err(GraphError::Duplicate(node.name().to_string()));
        }
        let mut todo = vec![node];
        while let Some(n) = todo.pop() {
            for (_, child) in n.children() {
                child.attach(n.name());
                if child.is_implicit() && !nodes.contains_key(child.name()) {
                    todo.push(child);
                }
            }
            nodes.insert(n.name().to_string(), n);
        }
        Ok(())
    }

    /// Looks a node up by name.
    pub fn get(&self, name: &str) -> Result<Arc<BlockNode>, GraphError> {
        self.lock().get(name).cloned().ok_or_else(|| GraphError::NotFound(name.to_string()))
    }

    /// All nodes, in name order.
    pub fn nodes(&self) -> Vec<Arc<BlockNode>> {
        self.lock().values().cloned().collect()
    }

    /// Deletes a user-created node that nobody uses, with its implicit children.
    pub fn remove(&self, name: &str) -> Result<Arc<BlockNode>, GraphError> {
        let mut nodes = self.lock();
        let node = nodes.get(name).cloned().ok_or_else(|| GraphError::NotFound(name.to_string()))?;
        if node.is_implicit() {
            return Err(GraphError::NotRoot(name.to_string()));
        }
        let users = node.users();
        if !users.is_empty() {
            return Err(GraphError::InUse(name.to_string(), users.join(", ")));
        }
        nodes.remove(name);
        let mut todo = vec![node.clone()];
        while let Some(n) = todo.pop() {
            for (_, child) in n.children() {
                child.detach(n.name());
                if child.is_implicit() {
                    nodes.remove(child.name());
                    todo.push(child);
                }
            }
        }
        Ok(node)
    }
}
