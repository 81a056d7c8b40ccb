"""xray-dist: fine-tune VGG16 on DICOM X-rays with Ray Train and Ray Tune."""
