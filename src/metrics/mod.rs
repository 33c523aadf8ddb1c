// Validation metrics reproducing YOLOv5 v7.0 val.py, for one image at a time.
// In: exported output0 rows [N, 5+nc] per image (nms), detections / labels in pixels.
// Out: NMS detections, true-positive matrices, per-class AP, confusion matrix, and the
// ValStats summary (P, R, mAP50, mAP50-95, per-class table, plus our two extra metrics).
//
// Flow: non_max_suppression -> scale_boxes (to original pixels) -> ValStats::update per
// image -> ValStats::finish. The pieces are public so tests can check each against YOLOv5.

pub mod ap;
pub mod boxes;
pub mod confusion;
pub mod matching;
pub mod nms;
pub mod npmath;
pub mod summary;

pub use ap::{ApPerClass, ap_per_class, compute_ap, smooth};
pub use boxes::{RatioPad, box_iou, clip_boxes, scale_boxes, xywh2xyxy};
pub use confusion::ConfusionMatrix;
pub use matching::{IOUV, process_batch};
pub use nms::non_max_suppression;
pub use summary::{ClassAccuracy, ClassMetrics, ValStats, ValSummary};
