//! The SMPL 24-joint skeleton as DanceBa uses it (reference §4.1, §5).

/// Number of joints.
pub const NUM_JOINTS: usize = 24;

/// SMPL joint names, in joint-index order.
pub const JOINT_NAMES: [&str; NUM_JOINTS] = [
    "pelvis",
    "left_hip",
    "right_hip",
    "spine1",
    "left_knee",
    "right_knee",
    "spine2",
    "left_ankle",
    "right_ankle",
    "spine3",
    "left_foot",
    "right_foot",
    "neck",
    "left_collar",
    "right_collar",
    "head",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hand",
    "right_hand",
];

/// Kinematic parent of each joint (`None` for the root).
pub const PARENTS: [Option<usize>; NUM_JOINTS] = [
    None,
    Some(0),
    Some(0),
    Some(0),
    Some(1),
    Some(2),
    Some(3),
    Some(4),
    Some(5),
    Some(6),
    Some(7),
    Some(8),
    Some(9),
    Some(9),
    Some(9),
    Some(12),
    Some(13),
    Some(14),
    Some(16),
    Some(17),
    Some(18),
    Some(19),
    Some(20),
    Some(21),
];

/// Joints of the upper-body half, in VQ-VAE channel order (`smpl_up`).
pub const SMPL_UP: [usize; 15] = [3, 6, 9, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23];

/// Joints of the lower-body half, in VQ-VAE channel order (`smpl_down`, root first).
pub const SMPL_DOWN: [usize; 9] = [0, 1, 2, 4, 5, 7, 8, 10, 11];
