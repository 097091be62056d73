//! Renderers: mp4 through ffmpeg (GIF fallback), self-contained html viewer.
