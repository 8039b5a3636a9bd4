"""The operator console (issue 19): server-rendered zh-CN pages for fleet
managers, family main-card holders, reviewers, finance, risk officers and
SREs, served by the HTTP edge (`fuelcard-api serve`) under /console/."""
