"""Registration and pairing of LR and HR scans (`volume`, `qa`, `slices`, `pairing`)."""
