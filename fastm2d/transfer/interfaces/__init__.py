"""The interfaces audio researchers already use, around fastm2d's Runtime: the HEAR 2021 API (`hear`), s3prl's
upstream expert for SUPERB (`s3prl`), the X-ARES encoder contract (`xares`). Each takes any weights
`load_encoder` reads."""
