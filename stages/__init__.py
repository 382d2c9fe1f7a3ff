"""imgpipe: folders of labelled images to a trained, evaluated and tracked classifier."""
