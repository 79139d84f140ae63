"""Pose input path for UniAnimate-style conditioning: keypoint files, UA-faithful drawing, pose videos,
and bone-length retargeting (unianimate_dit.md section 11). Pure numpy/PIL; no OpenCV."""
from wanjax.pose.align import AlignError, align_pose
from wanjax.pose.keypoints import PoseFileError, PoseSequence, load_keypoints, save_keypoints
from wanjax.pose.render import draw_pose, render_sequence
from wanjax.pose.video import (VideoError, prepare_pose_video, prepare_ref_pose, read_video,
                               resize_frames)

__all__ = ["AlignError", "PoseFileError", "PoseSequence", "VideoError", "align_pose", "draw_pose",
           "load_keypoints", "prepare_pose_video", "prepare_ref_pose", "read_video", "render_sequence",
           "resize_frames", "save_keypoints"]
